//! Real third-party SMTP peers: Postfix `smtp-sink` as an upstream process, Postfix
//! `smtp-source` and `swaks` as clients. Each helper returns `None` (and the test prints a
//! note and returns) when the tool is not installed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::proxy::{free_port, pid_listens_on, run_binary};

pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
pub const SWAKS: &str = "/usr/bin/swaks";

/// True if `tool` is installed; otherwise prints a note saying what is skipped.
pub fn have(tool: &str) -> bool {
    let ok = Path::new(tool).exists();
    if !ok {
        crate::skip!("{tool} is not installed; skipping this test");
    }
    ok
}

/// One message as captured by `smtp-sink -d` (the dump uses LF line ends).
#[derive(Debug, Clone)]
pub struct SinkMessage {
    pub helo: Option<String>,
    pub mail_args: String,
    pub rcpt_args: Vec<String>,
    /// Header and body as received, lines joined with LF (the dump's own final empty line removed).
    pub content: String,
}

/// Postfix `smtp-sink` capturing every message to a file.
pub struct SmtpSink {
    child: Option<Child>,
    pgid: i32,
    pub port: u16,
    dir: TempDir,
}

impl SmtpSink {
    /// Starts `smtp-sink` on a free loopback port with `extra` options (e.g. `-Q .`).
    pub fn start(extra: &[&str]) -> Option<SmtpSink> {
        if !have(SMTP_SINK) {
            return None;
        }
        let mut dir = tempfile::Builder::new()
            .prefix("smtp-sink.")
            .tempdir()
            .expect("tempdir");
        // smtp-sink drops to an unprivileged user when started as root; it must be able to
        // write its dump files.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        for _ in 0..4 {
            let port = free_port();
            let template = format!("{}/dump/%Y%m%d%H%M%S.", dir.path().display());
            let mut cmd = super::command(SMTP_SINK);
            if nix::unistd::geteuid().is_root() {
                cmd.args(["-u", "nobody"]);
            }
            let child = cmd
                .args(extra)
                .args(["-d", &template, &format!("127.0.0.1:{port}"), "64"])
                .stdin(Stdio::null())
                .stdout(fs::File::create(dir.path().join("log")).expect("log"))
                .stderr(fs::File::create(dir.path().join("err")).expect("err"))
                .process_group(0)
                .spawn()
                .expect("spawn smtp-sink");
            let pgid = child.id() as i32;
            super::register_process_group(pgid);
            let mut sink = SmtpSink {
                child: Some(child),
                pgid,
                port,
                dir,
            };
            if super::wait_until(Duration::from_secs(5), || {
                pid_listens_on(pgid, port) || !sink.alive()
            }) && sink.alive()
            {
                return Some(sink);
            }
            sink.stop();
            dir = std::mem::replace(&mut sink.dir, tempfile::tempdir().expect("tempdir"));
        }
        panic!("smtp-sink did not start")
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn out_address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn dump_dir(&self) -> PathBuf {
        self.dir.path().join("dump")
    }

    /// Captured messages, oldest first.
    pub fn messages(&self) -> Vec<SinkMessage> {
        let mut files: Vec<PathBuf> = fs::read_dir(self.dump_dir())
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        // Names carry whole seconds plus a random part: order by modification time.
        files.sort_by_key(|f| fs::metadata(f).and_then(|m| m.modified()).ok());
        files
            .iter()
            .filter_map(|f| parse_dump(&fs::read_to_string(f).ok()?))
            .collect()
    }

    /// Waits until `n` messages are captured and returns them.
    pub fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        super::wait_until(timeout, || self.messages().len() >= n);
        // A dump file is complete once smtp-sink has seen the end of data; give the last
        // write a moment.
        std::thread::sleep(Duration::from_millis(100));
        let m = self.messages();
        assert_eq!(
            m.len(),
            n,
            "smtp-sink captured {} messages, expected {n}",
            m.len()
        );
        m
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            let _ = c.wait();
            super::unregister_process_group(self.pgid);
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_dump(text: &str) -> Option<SinkMessage> {
    let mut helo = None;
    let mut mail_args = None;
    let mut rcpt_args = Vec::new();
    let mut lines = text.split('\n');
    // smtp-sink's own headers end with its three-line Received header.
    for l in lines.by_ref() {
        if let Some(v) = l.strip_prefix("X-Helo-Args: ") {
            helo = Some(v.to_string());
        } else if let Some(v) = l.strip_prefix("X-Mail-Args: ") {
            mail_args = Some(v.to_string());
        } else if let Some(v) = l.strip_prefix("X-Rcpt-Args: ") {
            rcpt_args.push(v.to_string());
        } else if l.starts_with("Received: ") {
            break;
        }
    }
    let rest: Vec<&str> = lines.skip(2).collect();
    let mut content = rest.join("\n");
    // The dump ends with its own empty line plus the file's final newline.
    if content.ends_with("\n\n") {
        content.truncate(content.len() - 1);
    }
    Some(SinkMessage {
        helo,
        mail_args: mail_args?,
        rcpt_args,
        content,
    })
}

/// Runs swaks against `addr` with extra arguments; `None` when swaks is missing.
pub fn swaks(addr: &std::net::SocketAddr, args: &[&str]) -> Option<Output> {
    if !have(SWAKS) {
        return None;
    }
    let port = addr.port().to_string();
    let mut all = vec![
        "--server",
        "127.0.0.1",
        "--port",
        &port,
        "--timeout",
        "15",
        "--helo",
        "swaks.example",
    ];
    all.extend_from_slice(args);
    let out = run_binary(Path::new(SWAKS), &all, Duration::from_secs(25)).expect("swaks timed out");
    Some(out)
}

/// Runs Postfix smtp-source against `addr`; `None` when it is missing.
pub fn smtp_source(addr: &std::net::SocketAddr, args: &[&str]) -> Option<Output> {
    if !have(SMTP_SOURCE) {
        return None;
    }
    let target = format!("127.0.0.1:{}", addr.port());
    let mut all: Vec<&str> = args.to_vec();
    all.push(&target);
    Some(
        run_binary(Path::new(SMTP_SOURCE), &all, Duration::from_secs(25))
            .expect("smtp-source timed out"),
    )
}
