//! The invariant every fault test checks, and the helpers to provoke faults.
//!
//! A [`Watch`] is taken on a running proxy after one warm-up message went through it, so
//! that whatever the proxy opens lazily (signal pipes, the first filter's reaper) is part
//! of the baseline. After the fault, [`Watch::check`] asserts that:
//! - the client never got a 2xx after its body for a message the upstream did not accept,
//!   unless the test declared it an explicit silent drop;
//! - no file is left in TempDirectory;
//! - no process is left that descends from the proxy, or that carries the proxy's
//!   `TMPDIR=<TempDirectory>` in its environment (that catches filter descendants which
//!   left the process group or were re-parented to init);
//! - the proxy's open file descriptors are back to the baseline;
//! - a new session still delivers a message.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::client::ReadError;
use crate::common::{self, Client, ClientReply, Proxy, Upstream};

pub const SENDER: &str = "<alice@faults.test>";
pub const RECIPIENT: &str = "<bob@faults.test>";

/// A message whose content carries `id` (in Message-ID and the body) so that the upstream's
/// copy can be matched to what the client was told.
pub fn tagged_message(id: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: fault {id}\r\nMessage-ID: <{id}@faults.test>\r\n\r\nid={id}\r\n"
    )
    .into_bytes();
    m.extend_from_slice(body);
    m
}

/// What the client saw for one message.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: String,
    /// Every reply in order, e.g. `["220 ...", "250 ...", ...]` (first lines only).
    pub replies: Vec<String>,
    /// The reply to the end of the body, if the body was sent and answered.
    pub final_reply: Option<ClientReply>,
    /// How the exchange ended when a reply was missing (closed, timed out).
    pub ended: Option<String>,
}

impl Attempt {
    pub fn new(id: &str) -> Attempt {
        Attempt {
            id: id.into(),
            replies: Vec::new(),
            final_reply: None,
            ended: None,
        }
    }

    pub fn final_code(&self) -> Option<u16> {
        self.final_reply.as_ref().map(|r| r.code)
    }

    /// True if the client was told the message was taken.
    pub fn acknowledged(&self) -> bool {
        self.final_code().is_some_and(|c| (200..300).contains(&c))
    }

    /// Reads one reply, recording it; `None` (and `ended` set) when none came.
    pub fn read(&mut self, c: &mut Client) -> Option<ClientReply> {
        match c.try_reply() {
            Ok(r) => {
                self.replies
                    .push(r.raw_str().lines().next().unwrap_or("").to_string());
                Some(r)
            }
            Err(e) => {
                self.ended = Some(match e {
                    ReadError::Closed { partial } => {
                        format!("closed (partial {})", common::show(&partial))
                    }
                    ReadError::Timeout { partial } => {
                        format!("timed out (partial {})", common::show(&partial))
                    }
                    other => other.to_string(),
                });
                None
            }
        }
    }

    /// Sends `line` (CRLF added) and reads its reply; `None` if the connection ended.
    pub fn cmd(&mut self, c: &mut Client, line: &str) -> Option<ClientReply> {
        if let Err(e) = c.try_send(format!("{line}\r\n").as_bytes()) {
            self.ended = Some(format!("send {line}: {e}"));
            return None;
        }
        self.read(c)
    }
}

/// A client that goes through a whole transaction whatever it is told (a 4xx to RCPT does
/// not stop it from sending DATA), so that every path to a final reply is exercised.
/// Stops only when the connection ends or a reply does not come within `reply_timeout`.
/// The sender is `<id@faults.test>`, so filters can tell fault messages (ids starting
/// with `fault`) from the warm-up and follow-up ones (`alice@`).
pub fn stubborn_transaction(addr: SocketAddr, id: &str, reply_timeout: Duration) -> Attempt {
    let mut a = Attempt::new(id);
    let mut c = match Client::try_connect(addr) {
        Ok(c) => c,
        Err(e) => {
            a.ended = Some(format!("connect: {e}"));
            return a;
        }
    };
    c.set_timeout(reply_timeout);
    if a.read(&mut c).is_none() {
        return a;
    }
    let content = tagged_message(id, b"A message under a fault.\r\n");
    for line in [
        "EHLO client.faults.test".to_string(),
        format!("MAIL FROM:<{id}@faults.test>"),
        format!("RCPT TO:{RECIPIENT}"),
    ] {
        if a.cmd(&mut c, &line).is_none() {
            return a;
        }
    }
    match a.cmd(&mut c, "DATA") {
        Some(r) if r.code == 354 => {}
        Some(r) => {
            // A refused DATA is the final word on this message.
            a.final_reply = Some(r);
            return a;
        }
        None => return a,
    }
    if let Err(e) = c.try_send(&common::stuff(&content)) {
        a.ended = Some(format!("send body: {e}"));
        return a;
    }
    a.final_reply = a.read(&mut c);
    if a.final_reply.is_some() {
        let _ = a.cmd(&mut c, "QUIT");
    }
    a
}

/// One normal message in its own session; panics unless it is accepted.
pub fn deliver_one(addr: SocketAddr, id: &str) -> ClientReply {
    let mut c = Client::open(addr);
    let r = c
        .transaction(
            SENDER,
            &[RECIPIENT],
            &tagged_message(id, b"Nothing wrong here.\r\n"),
        )
        .final_reply;
    assert_eq!(r.code, 250, "message {id} was not accepted: {r:?}");
    let _ = c.try_send(b"QUIT\r\n");
    let _ = c.try_reply();
    r
}

/// Whether the upstream accepted (complete, 2xx final reply) a message carrying `id`.
pub fn upstream_accepted(up: &Upstream, id: &str) -> bool {
    let needle = format!("id={id}\r\n");
    up.delivered()
        .iter()
        .any(|m| contains(&m.content, needle.as_bytes()))
}

/// A filter script body: runs `fault` (shell code) for fault messages, then passes the
/// message through (pipe mode: `exec cat`; file mode: `exit 0`).
pub fn switch_filter(fault: &str, file_mode: bool) -> String {
    let pass = if file_mode { "exit 0" } else { "exec cat" };
    format!("case \"$SENDER\" in\nfault*)\n{fault}\n;;\nesac\n{pass}\n")
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Processes and descriptors, from /proc.

/// Number of open descriptors of `pid`.
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// What each descriptor of `pid` points to (for failure messages).
pub fn fd_targets(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let target = fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "?".into());
                    format!("{}->{target}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Parent pid of every process.
fn parents() -> HashMap<i32, i32> {
    let mut m = HashMap::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return m;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces and parentheses: parse after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            m.insert(pid, ppid);
        }
    }
    m
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Every process below `root` (children, grandchildren, ...), with its command line.
pub fn descendants(root: i32) -> Vec<(i32, String)> {
    let parents = parents();
    let mut out = Vec::new();
    for &pid in parents.keys() {
        let mut p = pid;
        // Bounded walk: pid reuse could in theory make a cycle.
        for _ in 0..64 {
            match parents.get(&p) {
                Some(&pp) if pp == root => {
                    out.push((pid, cmdline(pid)));
                    break;
                }
                Some(&pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    out.sort();
    out
}

/// Every process whose environment contains `entry` (e.g. `TMPDIR=/the/temp/dir`).
pub fn processes_with_env(entry: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|kv| kv == entry.as_bytes()) {
            out.push((pid, cmdline(pid)));
        }
    }
    out.sort();
    out
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The invariant.

pub struct Watch {
    pub pid: i32,
    pub temp_directory: PathBuf,
    pub fd_baseline: usize,
    fd_baseline_targets: Vec<String>,
    next_id: usize,
}

impl Watch {
    /// Sends one warm-up message, waits for the proxy to settle and records the baseline.
    /// `temp_directory` is the proxy's TempDirectory (the filters' TMPDIR).
    pub fn start(p: &Proxy, up: &Upstream, temp_directory: &Path) -> Watch {
        deliver_one(p.addr(), "warmup");
        assert!(upstream_accepted(up, "warmup"), "warm-up message lost");
        let pid = p.pid();
        let fd_baseline = settle_fds(pid);
        Watch {
            pid,
            temp_directory: temp_directory.to_path_buf(),
            fd_baseline,
            fd_baseline_targets: fd_targets(pid),
            next_id: 0,
        }
    }

    /// A fresh message id for this test.
    pub fn id(&mut self, what: &str) -> String {
        self.next_id += 1;
        format!("{what}-{}", self.next_id)
    }

    /// Checks the whole invariant after the fault; `drops` are ids the filter silently
    /// dropped on purpose (a 2xx without delivery is right for them).
    pub fn check(&self, p: &Proxy, up: &Upstream, attempts: &[Attempt], drops: &[&str]) {
        // Replies first: the upstream may still be receiving when the client was answered.
        std::thread::sleep(Duration::from_millis(100));
        for a in attempts {
            if a.acknowledged() && !drops.contains(&a.id.as_str()) {
                let accepted =
                    common::wait_until(Duration::from_secs(3), || upstream_accepted(up, &a.id));
                assert!(
                    accepted,
                    "the client got {:?} for message {} but the upstream did not accept it; \
                     client saw {:?}; upstream: {:#?}",
                    a.final_reply,
                    a.id,
                    a.replies,
                    up.summary()
                );
            }
        }
        self.check_clean(p);
        // And the proxy still serves.
        let id = format!("after-{}", self.next_id);
        deliver_one(p.addr(), &id);
        assert!(
            common::wait_until(Duration::from_secs(5), || upstream_accepted(up, &id)),
            "message after the fault not delivered: {:#?}",
            up.summary()
        );
    }

    /// Temp files, processes and descriptors only.
    pub fn check_clean(&self, p: &Proxy) {
        let tmp_clean = common::wait_until(Duration::from_secs(8), || {
            dir_entries(&self.temp_directory).is_empty()
        });
        assert!(
            tmp_clean,
            "files left in TempDirectory {}: {:?}",
            self.temp_directory.display(),
            dir_entries(&self.temp_directory)
        );
        let marker = format!("TMPDIR={}", self.temp_directory.display());
        let mut left = Vec::new();
        let gone = common::wait_until(Duration::from_secs(8), || {
            left = descendants(self.pid);
            left.extend(processes_with_env(&marker));
            left.is_empty()
        });
        if !gone {
            for (pid, _) in &left {
                p.adopt_pid(*pid);
            }
        }
        assert!(gone, "processes left behind by the proxy: {left:?}");
        let mut now = 0;
        let back = common::wait_until(Duration::from_secs(8), || {
            now = fd_count(self.pid);
            now == self.fd_baseline
        });
        assert!(
            back,
            "the proxy holds {now} descriptors, {} at the baseline;\n now: {:?}\n then: {:?}",
            self.fd_baseline,
            fd_targets(self.pid),
            self.fd_baseline_targets
        );
    }
}

/// Waits until the descriptor count has not changed for 300 ms and returns it.
pub fn settle_fds(pid: i32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = fd_count(pid);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let n = fd_count(pid);
        if n != last {
            last = n;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(300) {
            break;
        }
    }
    last
}

pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Replaces the value of `name` in the proxy's generated config, sends SIGHUP and waits
/// until the reload is logged.
pub fn reconfigure(p: &Proxy, name: &str, value: &str) {
    let text = fs::read_to_string(&p.conf_path).expect("read config");
    let prefix = format!("{name}:");
    let mut found = false;
    let new: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                format!("{name}: {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "{name} not in the config");
    let before = p.log().matches("configuration reloaded").count();
    fs::write(&p.conf_path, new.join("\n") + "\n").expect("write config");
    p.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            p.log().matches("configuration reloaded").count() > before
        }),
        "reload of {name} not logged: {}",
        p.log()
    );
}
