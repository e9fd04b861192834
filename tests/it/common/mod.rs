//! Integration-test harness for proxsmtpd.
//!
//! Layout:
//! - `upstream`: a scriptable upstream SMTP server (the proxy's OutAddress) that records
//!   everything it receives.
//! - `client`: a raw SMTP client that reads whole multi-line replies, with timeouts.
//! - `proxy`: starts the binary under test with a generated `proxsmtpd.conf`, filter
//!   script helpers, the environment recorder filter, temp-dir checks.
//! - `metrics`: polls the admin `/metrics` endpoint until a series has a value.
//! - `milter`: a scriptable milter that records every packet it receives.
//! - `peers`: real third-party peers (Postfix `smtp-sink`/`smtp-source`, `swaks`).
//!
//! The binary under test is `CARGO_BIN_EXE_proxsmtpd`, or `PROXSMTPD_BIN` when set (for
//! example `/usr/sbin/proxsmtpd` to check the harness against the C original).
//! Every test body runs under [`timed`], so a stuck test fails instead of hanging.
#![allow(dead_code)]

pub mod client;
pub mod daemon;
pub mod hook_server;
pub mod metrics;
pub mod milter;
pub mod milter_daemons;
pub mod peers;
pub mod proxy;
pub mod samples;
pub mod upstream;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use client::{Client, Reply as ClientReply};
#[allow(unused_imports)]
pub use daemon::Daemon;
#[allow(unused_imports)]
pub use proxy::{Proxy, ProxyBuilder};
#[allow(unused_imports)]
pub use upstream::{Reply, Upstream};

/// The variable that turns a skipped prerequisite into a failure. `scripts/test.sh` sets it
/// for `cargo test` only: the proxy refuses unknown `PROXSMTPD_*` variables, so the harness
/// removes it from every process it starts (see [`command`]).
pub const STRICT_VAR: &str = "PROXSMTPD_TEST_STRICT";

/// Where skipped tests are listed, one line each (`scripts/test.sh` empties it before
/// `cargo test` and prints it at the end).
pub const SKIPPED_LIST: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/skipped-tests.txt");

/// True when a missing prerequisite must fail the test.
pub fn strict() -> bool {
    std::env::var(STRICT_VAR).is_ok_and(|v| v == "1")
}

/// A test whose prerequisite (root, a tool, a free port) is missing. With
/// `PROXSMTPD_TEST_STRICT=1` (set by `scripts/test.sh`, as in CI, where every prerequisite
/// is installed) that is a failure; otherwise the test prints the reason, appends it to
/// [`SKIPPED_LIST`] and returns.
pub fn skipped(reason: &str) {
    assert!(!strict(), "prerequisite missing ({STRICT_VAR}=1): {reason}");
    let test = thread::current().name().unwrap_or("?").to_string();
    eprintln!("note: {reason}");
    record_skip(&test, reason);
}

fn record_skip(test: &str, reason: &str) {
    use std::io::Write;
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let line = format!("{test}: {}\n", reason.replace('\n', " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SKIPPED_LIST)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("note: cannot list the skip in {SKIPPED_LIST}: {e}");
    }
}

/// [`skipped`] with a formatted reason; the caller returns after it.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)+) => {
        $crate::common::skipped(&format!($($arg)+))
    };
}

/// `Command::new` without the harness's own `PROXSMTPD_TEST_*` variables ([`STRICT_VAR`],
/// `PROXSMTPD_TEST_KEEP`) in the child's environment: the proxy refuses unknown
/// `PROXSMTPD_*` variables, and every process a test starts (the proxy, its wrappers,
/// scripts that start it) goes through here.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PROXSMTPD_TEST_") {
            c.env_remove(name);
        }
    }
    c
}

/// The C original, for differential tests.
pub const REFERENCE_BIN: &str = "/usr/sbin/proxsmtpd";

/// The binary under test.
pub fn binary() -> PathBuf {
    match std::env::var_os("PROXSMTPD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_proxsmtpd")),
    }
}

/// True when the binary under test is the C original (some tests print a note then).
pub fn testing_reference() -> bool {
    binary() == std::path::Path::new(REFERENCE_BIN)
}

// ---------------------------------------------------------------------------------------
// Per-test watchdog. Processes started by a test register their process group under the
// test's scope, so that a test which overruns its limit can have them killed (the test
// thread itself cannot be stopped; killing its peers makes its blocking calls fail fast).

static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);
static PROCESS_GROUPS: Mutex<Vec<(u64, i32)>> = Mutex::new(Vec::new());

thread_local! {
    static SCOPE: Cell<u64> = const { Cell::new(0) };
}

pub(crate) fn register_process_group(pgid: i32) {
    let scope = SCOPE.with(|s| s.get());
    PROCESS_GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((scope, pgid));
}

pub(crate) fn unregister_process_group(pgid: i32) {
    PROCESS_GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&(_, p)| p != pgid);
}

fn kill_scope(scope: u64) {
    let groups: Vec<i32> = PROCESS_GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(s, _)| *s == scope)
        .map(|&(_, p)| p)
        .collect();
    for pgid in groups {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Runs a test body with a time limit. Panics inside the body fail the test as usual; an
/// overrun kills the processes the body started and fails the test.
pub fn timed<F: FnOnce() + Send + 'static>(limit_secs: u64, body: F) {
    let scope = NEXT_SCOPE.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<()>();
    let name = thread::current().name().unwrap_or("test").to_string();
    let handle = thread::Builder::new()
        .name(name)
        .spawn(move || {
            // Dropped on return and on unwind alike, which wakes the watcher.
            let _done = tx;
            SCOPE.with(|s| s.set(scope));
            body();
        })
        .expect("spawn test thread");
    match rx.recv_timeout(Duration::from_secs(limit_secs)) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            kill_scope(scope);
            panic!("test exceeded its {limit_secs}s limit (its processes were killed)");
        }
        _ => {
            if let Err(payload) = handle.join() {
                std::panic::resume_unwind(payload);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small shared helpers.

/// Polls `probe` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || cond().then_some(())).is_some()
}

/// The names of the entries of `dir`, sorted; none when it cannot be read.
pub fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// Dot-stuffs message content (CRLF lines) and appends the end-of-data marker. A missing
/// final CRLF is added, as an SMTP client does.
pub fn stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + content.len() / 50 + 8);
    let mut at_line_start = true;
    for &b in content {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Removes dot-stuffing from wire data (without the end-of-data marker).
pub fn unstuff(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire.len());
    let mut at_line_start = true;
    for &b in wire {
        let skip = at_line_start && b == b'.';
        at_line_start = b == b'\n';
        if !skip {
            out.push(b);
        }
    }
    out
}

/// Turns every bare LF and bare CR into CRLF (what the proxy must do to DATA content).
pub fn normalize_crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// A small RFC 5322 message with CRLF line ends.
pub fn message(subject: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@test.example>\r\n\r\n"
    )
    .into_bytes();
    m.extend_from_slice(body);
    m
}

/// The default test message.
pub fn default_message() -> Vec<u8> {
    message("test", b"Hello world.\r\nThis is a test message.\r\n")
}

/// Shows bytes for assertion messages, cut to a readable length.
pub fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let mut e: String = s.escape_debug().collect();
    if e.len() > 600 {
        let tail: String = e
            .chars()
            .rev()
            .take(150)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        e = format!(
            "{}...<{} bytes>...{}",
            &e[..e.char_indices().nth(400).map_or(e.len(), |c| c.0)],
            b.len(),
            tail
        );
    }
    format!("\"{e}\"")
}

/// Counts how many times each line occurs (used to spot leaked or duplicated commands).
pub fn count_lines(lines: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in lines {
        *m.entry(l.clone()).or_insert(0) += 1;
    }
    m
}

/// Describes where two byte strings first differ (for assertion messages).
pub fn diff_bytes(left: &[u8], right: &[u8]) -> Option<String> {
    if left == right {
        return None;
    }
    let at = left
        .iter()
        .zip(right)
        .position(|(a, b)| a != b)
        .unwrap_or(left.len().min(right.len()));
    let from = at.saturating_sub(40);
    let ctx = |b: &[u8]| show(&b[from.min(b.len())..(at + 60).min(b.len())]);
    Some(format!(
        "first difference at byte {at} (lengths {} vs {}):\n  left[{from}..]: {}\n right[{from}..]: {}",
        left.len(),
        right.len(),
        ctx(left),
        ctx(right)
    ))
}

/// `assert_eq!` for byte strings with a readable difference.
#[macro_export]
macro_rules! assert_bytes_eq {
    ($left:expr, $right:expr $(,)?) => {
        $crate::assert_bytes_eq!($left, $right, "bytes differ")
    };
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (l, r): (&[u8], &[u8]) = (&$left[..], &$right[..]);
        if let Some(d) = $crate::common::diff_bytes(l, r) {
            panic!("{}: {}", format!($($arg)+), d);
        }
    }};
}
