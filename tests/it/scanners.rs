//! The example scanner filters (`examples/filters/spamassassin.sh`, `clamav.sh`) against the
//! real scanners: a spamd and a clamd started here on loopback (never the packages' system
//! services), with the proxy in front of the scriptable upstream. Shows what the scripts'
//! header comments promise: spam and viruses rejected with nothing sent upstream, clean mail
//! delivered (with SpamAssassin's headers), and a scanner that is down, silent or given a
//! too large message leading to the documented fail-open or fail-closed outcome.
//!
//! spamd, spamc, clamd and clamdscan must be installed (`scripts/install-test-deps.sh`);
//! without them every test here fails. No network is used: spamd runs with local tests
//! only and a private home, clamd with a database directory holding one signature of ours,
//! for the EICAR test string.

use crate::common;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::proxy::{free_port, pid_alive};
use crate::common::samples::{
    eicar, eicar_attachment_message, gtube_message, ham_message, spamd_answers, spamd_args,
    EICAR_SIGNATURE,
};
use crate::common::{message, secs, show, timed, Proxy, ProxyBuilder, Upstream};

// ---------------------------------------------------------------------------------------
// Prerequisites and the scanner daemons.

/// The full path of an installed program; panics naming the package when it is missing.
fn require(program: &str, package: &str) -> PathBuf {
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{program} is not installed: this test needs the Debian package {package} \
         (scripts/install-test-deps.sh installs it)"
    );
}

fn filter(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/filters")
        .join(name);
    assert!(p.is_file(), "missing example filter {}", p.display());
    p.display().to_string()
}

/// A scanner daemon running under a guard shell. The guard holds the daemon's process group
/// and waits on a pipe from this test process; when the pipe closes (the test binary ends,
/// however it ends) it stops the daemon and removes its directory. So a daemon shared by
/// all the tests of this binary outlives none of them.
struct Scanner {
    _guard: ChildStdin,
    dir: PathBuf,
    pid: i32,
    port: u16,
}

/// Runs `program args` in `dir` under the guard; returns once the daemon's pid is known.
fn spawn_guarded(
    dir: PathBuf,
    program: &Path,
    args: &[String],
) -> Result<(ChildStdin, i32), String> {
    const GUARD: &str = r#"dir=$1; shift
"$@" </dev/null &
echo $! > "$dir/daemon.pid"
read -r _
trap '' TERM
kill -TERM 0
wait
rm -rf "$dir"
"#;
    let log = fs::File::create(dir.join("daemon.log")).map_err(|e| format!("log file: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("log file: {e}"))?;
    let mut child = common::command("/bin/sh")
        .arg("-c")
        .arg(GUARD)
        .arg("guard")
        .arg(&dir)
        .arg(program)
        .args(args)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let stdin = child.stdin.take().expect("guard stdin");
    // The guard is not waited for: it ends by itself when the pipe closes.
    drop(child);
    let pid = common::wait_for(secs(5), || {
        fs::read_to_string(dir.join("daemon.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    })
    .ok_or_else(|| format!("{} did not start", program.display()))?;
    Ok((stdin, pid))
}

impl Scanner {
    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Polls `ready` until it holds; fails early if the daemon exits.
    fn wait_ready(
        self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut(&Scanner) -> bool,
    ) -> Result<Scanner, String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if ready(&self) {
                eprintln!("{what} ready after {} ms", start.elapsed().as_millis());
                return Ok(self);
            }
            if !pid_alive(self.pid) {
                return Err(format!(
                    "{what} exited during startup; its log:\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{what} not ready after {} s; its log:\n{}",
            limit.as_secs(),
            self.log()
        ))
    }
}

fn private_dir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
        .keep();
    // spamd's children drop to an unprivileged user when it is started as root.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// spamd on 127.0.0.1, started once for this test binary.
fn spamd() -> &'static Scanner {
    static SPAMD: OnceLock<Result<Scanner, String>> = OnceLock::new();
    let spamd = require("spamd", "spamd");
    let spamc = require("spamc", "spamc");
    match SPAMD.get_or_init(|| start_spamd(&spamd, &spamc)) {
        Ok(s) => s,
        Err(e) => panic!("spamd could not be started: {e}"),
    }
}

fn start_spamd(spamd: &Path, spamc: &Path) -> Result<Scanner, String> {
    let dir = private_dir("proxsmtpd-spamd.");
    let port = free_port();
    let args = spamd_args(&dir, port, (2, 4)).map_err(|e| e.to_string())?;
    let (guard, pid) = spawn_guarded(dir.clone(), spamd, &args)?;
    let scanner = Scanner {
        _guard: guard,
        dir,
        pid,
        port,
    };
    let ping = |s: &Scanner| spamd_answers(spamc, s.port);
    scanner.wait_ready("spamd", secs(60), ping)
}

/// clamd on 127.0.0.1 (TCP) and on a unix socket, started once for this test binary.
struct Clamd {
    scanner: Scanner,
    /// A clamdscan configuration naming clamd by TCPSocket and TCPAddr, as one names a
    /// clamd Service.
    tcp_config: PathBuf,
    socket: PathBuf,
}

fn clamd() -> &'static Clamd {
    static CLAMD: OnceLock<Result<Clamd, String>> = OnceLock::new();
    let clamd = require("clamd", "clamav-daemon");
    let clamdscan = require("clamdscan", "clamdscan");
    match CLAMD.get_or_init(|| start_clamd(&clamd, &clamdscan)) {
        Ok(c) => c,
        Err(e) => panic!("clamd could not be started: {e}"),
    }
}

fn start_clamd(clamd: &Path, clamdscan: &Path) -> Result<Clamd, String> {
    let dir = private_dir("proxsmtpd-clamd.");
    let db = dir.join("db");
    let tmp = dir.join("tmp");
    fs::create_dir(&db).map_err(|e| e.to_string())?;
    fs::create_dir(&tmp).map_err(|e| e.to_string())?;
    // No database can be downloaded: one extended (.ndb) signature of our own, the EICAR
    // string anywhere in any file type. clamd's mail parser decodes MIME parts before
    // matching, so it also finds the string in a base64 attachment.
    let hex: String = eicar().bytes().map(|b| format!("{b:02x}")).collect();
    fs::write(
        db.join("test.ndb"),
        format!("{EICAR_SIGNATURE}:0:*:{hex}\n"),
    )
    .map_err(|e| e.to_string())?;
    let port = free_port();
    let socket = dir.join("clamd.sock");
    let conf = dir.join("clamd.conf");
    fs::write(
        &conf,
        format!(
            "Foreground yes\nDatabaseDirectory {}\nTemporaryDirectory {}\nLocalSocket {}\n\
             TCPSocket {port}\nTCPAddr 127.0.0.1\nLogSyslog no\nLogTime yes\n",
            db.display(),
            tmp.display(),
            socket.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let tcp_config = dir.join("clamdscan-tcp.conf");
    fs::write(
        &tcp_config,
        format!("TCPSocket {port}\nTCPAddr 127.0.0.1\n"),
    )
    .map_err(|e| e.to_string())?;
    let args = vec![
        "--foreground".to_string(),
        "-c".to_string(),
        conf.display().to_string(),
    ];
    let (guard, pid) = spawn_guarded(dir.clone(), clamd, &args)?;
    let scanner = Scanner {
        _guard: guard,
        dir,
        pid,
        port,
    };
    let ping = |_: &Scanner| {
        common::command(clamdscan)
            .arg(format!("--config-file={}", tcp_config.display()))
            .args(["--ping", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success())
    };
    let scanner = scanner.wait_ready("clamd", secs(60), ping)?;
    Ok(Clamd {
        scanner,
        tcp_config,
        socket,
    })
}

/// A port on 127.0.0.1 where nothing listens: a scanner that is down.
fn closed_port() -> u16 {
    free_port()
}

/// A "spamd" that accepts connections and never answers: a scanner that hangs.
fn silent_listener() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

// ---------------------------------------------------------------------------------------
// The proxy and the checks.

/// A proxy in front of `up` running `settings script` as its filter, with the product's
/// default FilterTimeout.
fn proxy(up: &Upstream, filter_type: &str, script: &str, settings: &str) -> Proxy {
    ProxyBuilder::new()
        .upstream(up)
        .set("FilterType", filter_type)
        .set("FilterTimeout", "30")
        .set("FilterCommand", &format!("{settings} {}", filter(script)))
        .start()
}

fn spam_proxy(up: &Upstream, settings: &str) -> Proxy {
    proxy(up, "pipe", "spamassassin.sh", settings)
}

fn clam_proxy(up: &Upstream, settings: &str) -> Proxy {
    proxy(up, "file", "clamav.sh", settings)
}

fn spamd_settings() -> String {
    format!("SPAMD_HOST=127.0.0.1 SPAMD_PORT={}", spamd().port)
}

/// Sends `content` through the proxy; returns the final reply's code and text.
fn send(p: &Proxy, content: &[u8]) -> (u16, String) {
    let mut c = p.open();
    c.set_timeout(secs(40));
    let r = c.send_mail(content);
    (r.code, r.text())
}

/// The message was refused and the upstream got no DATA, only the RSET after it.
fn assert_nothing_delivered(up: &Upstream, p: &Proxy) {
    assert!(
        up.wait_command(0, secs(5), |l| l == "RSET"),
        "no RSET upstream after the refusal: {:?}",
        up.session(0).lines()
    );
    let s = up.session(0);
    assert!(
        !s.verbs().contains(&"DATA".to_string()) && s.messages.is_empty(),
        "the upstream got the refused message: {:?}",
        s.lines()
    );
    p.assert_tmp_clean();
}

fn delivered_one(up: &Upstream) -> Vec<u8> {
    up.expect_one().content
}

fn has_header(content: &[u8], name: &str) -> bool {
    let head_end = content
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(content.len());
    String::from_utf8_lossy(&content[..head_end])
        .lines()
        .any(|l| {
            l.to_ascii_lowercase()
                .starts_with(&format!("{}:", name.to_ascii_lowercase()))
        })
}

fn eicar_inline_message() -> Vec<u8> {
    message("inline", format!("{}\r\n", eicar()).as_bytes())
}

// ---------------------------------------------------------------------------------------
// spamassassin.sh

#[test]
fn spam_gtube_is_rejected_and_nothing_reaches_the_upstream() {
    timed(90, || {
        let up = Upstream::start();
        let p = spam_proxy(&up, &spamd_settings());
        let (code, text) = send(&p, &gtube_message());
        assert_eq!(code, 550, "GTUBE: {text}");
        assert!(text.contains("rejected as spam"), "{text}");
        assert_nothing_delivered(&up, &p);
    });
}

#[test]
fn spam_ham_is_delivered_with_spamassassin_headers() {
    timed(90, || {
        // The same with FAIL_CLOSED=1: spamc -x changes nothing while spamd answers.
        for extra in ["", "FAIL_CLOSED=1"] {
            let up = Upstream::start();
            let p = spam_proxy(&up, &format!("{} {extra}", spamd_settings()));
            let (code, text) = send(&p, &ham_message());
            assert_eq!(code, 250, "ham ({extra}): {text}");
            let got = delivered_one(&up);
            let s = String::from_utf8_lossy(&got);
            for h in ["X-Spam-Checker-Version", "X-Spam-Status"] {
                assert!(
                    has_header(&got, h),
                    "no {h} header ({extra}): {}",
                    show(&got)
                );
            }
            assert!(s.contains("X-Spam-Status: No, score="), "{}", show(&got));
            assert!(
                s.contains("shall we meet for lunch on Thursday"),
                "{}",
                show(&got)
            );
        }
    });
}

#[test]
fn spam_spamd_down_fails_open_by_default() {
    timed(60, || {
        require("spamc", "spamc");
        let up = Upstream::start();
        let settings = format!("SPAMD_HOST=127.0.0.1 SPAMD_PORT={}", closed_port());
        let p = spam_proxy(&up, &settings);
        let sent = gtube_message();
        let (code, text) = send(&p, &sent);
        assert_eq!(code, 250, "spamd down, fail open: {text}");
        // Delivered unscanned: exactly as sent, without SpamAssassin's headers.
        assert_bytes_eq!(delivered_one(&up), sent, "spamd down, fail open");
    });
}

#[test]
fn spam_spamd_down_with_fail_closed_defers() {
    timed(60, || {
        require("spamc", "spamc");
        let up = Upstream::start();
        let settings = format!(
            "SPAMD_HOST=127.0.0.1 SPAMD_PORT={} FAIL_CLOSED=1",
            closed_port()
        );
        let p = spam_proxy(&up, &settings);
        let (code, text) = send(&p, &ham_message());
        assert_eq!(code, 451, "spamd down, fail closed: {text}");
        assert!(text.contains("Spam scanner unavailable"), "{text}");
        assert_nothing_delivered(&up, &p);
    });
}

#[test]
fn spam_silent_spamd_times_out_into_the_chosen_outcome() {
    timed(90, || {
        require("spamc", "spamc");
        // SPAMC_TIMEOUT, not the proxy's FilterTimeout (30 s, "451 Local Error"), decides.
        let port = silent_listener();
        for (extra, want) in [("FAIL_CLOSED=1", 451), ("", 250)] {
            let up = Upstream::start();
            let settings =
                format!("SPAMD_HOST=127.0.0.1 SPAMD_PORT={port} SPAMC_TIMEOUT=2 {extra}");
            let p = spam_proxy(&up, &settings);
            let start = Instant::now();
            let sent = ham_message();
            let (code, text) = send(&p, &sent);
            let took = start.elapsed();
            assert_eq!(code, want, "silent spamd ({extra}): {text}");
            assert!(took < secs(20), "silent spamd ({extra}) took {took:?}");
            if want == 451 {
                assert!(text.contains("Spam scanner unavailable"), "{text}");
                assert_nothing_delivered(&up, &p);
            } else {
                assert_bytes_eq!(delivered_one(&up), sent, "silent spamd, fail open");
            }
        }
    });
}

#[test]
fn spam_mail_over_the_size_limit_passes_unscanned() {
    timed(90, || {
        let mut sent = gtube_message();
        for i in 0..100 {
            sent.extend_from_slice(
                format!("padding line {i:03} of a large message\r\n").as_bytes(),
            );
        }
        assert!(sent.len() > 3000 && sent.len() < 5000, "{}", sent.len());
        for extra in ["", "FAIL_CLOSED=1"] {
            let up = Upstream::start();
            let p = spam_proxy(
                &up,
                &format!("{} SPAMC_MAX_SIZE=3000 {extra}", spamd_settings()),
            );
            let (code, text) = send(&p, &sent);
            assert_eq!(code, 250, "large GTUBE message ({extra}): {text}");
            assert_bytes_eq!(delivered_one(&up), sent, "large message ({extra})");
        }
        // Under the limit, the same message is scanned and rejected.
        let up = Upstream::start();
        let p = spam_proxy(&up, &format!("{} SPAMC_MAX_SIZE=5000", spamd_settings()));
        let (code, text) = send(&p, &sent);
        assert_eq!(code, 550, "GTUBE message under the limit: {text}");
        assert_nothing_delivered(&up, &p);
    });
}

#[test]
fn spam_spamc_error_comes_before_the_smtp_reply_on_stderr() {
    timed(60, || {
        require("spamc", "spamc");
        let out = common::command(filter("spamassassin.sh"))
            .env("SPAMD_HOST", "127.0.0.1")
            .env("SPAMD_PORT", closed_port().to_string())
            .env("FAIL_CLOSED", "1")
            .stdin(fs::File::open(write_temp(&ham_message()).path()).expect("open"))
            .output()
            .expect("run spamassassin.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(out.stdout.is_empty(), "a deferred message has no output");
        assert_eq!(
            lines.last().copied(),
            Some("451 4.7.1 Spam scanner unavailable, try again later"),
            "{stderr}"
        );
        assert!(
            lines[..lines.len() - 1]
                .iter()
                .any(|l| l.contains("spamc: connect")),
            "spamc's error is not shown: {stderr}"
        );
    });
}

/// A message in a file of its own (removed when dropped).
fn write_temp(content: &[u8]) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("proxsmtpd-scanners.")
        .tempfile()
        .expect("tempfile");
    fs::write(f.path(), content).expect("write");
    f
}

// ---------------------------------------------------------------------------------------
// clamav.sh

#[test]
fn clam_eicar_inline_is_rejected_over_every_kind_of_address() {
    timed(90, || {
        let c = clamd();
        let settings = [
            format!("CLAMD_ADDRESS=127.0.0.1:{}", c.scanner.port),
            format!("CLAMD_ADDRESS={}", c.socket.display()),
            format!("CLAMD_CONFIG={}", c.tcp_config.display()),
        ];
        for s in &settings {
            let up = Upstream::start();
            let p = clam_proxy(&up, s);
            let (code, text) = send(&p, &eicar_inline_message());
            assert_eq!(code, 554, "EICAR inline ({s}): {text}");
            assert!(
                text.contains(&format!("Virus found: {EICAR_SIGNATURE}")),
                "({s}) {text}"
            );
            assert_nothing_delivered(&up, &p);
        }
    });
}

#[test]
fn clam_eicar_base64_attachment_is_rejected() {
    timed(60, || {
        let c = clamd();
        let up = Upstream::start();
        let p = clam_proxy(&up, &format!("CLAMD_CONFIG={}", c.tcp_config.display()));
        let (code, text) = send(&p, &eicar_attachment_message());
        assert_eq!(code, 554, "EICAR attachment: {text}");
        assert!(
            text.contains(&format!("Virus found: {EICAR_SIGNATURE}")),
            "{text}"
        );
        assert_nothing_delivered(&up, &p);
    });
}

#[test]
fn clam_clean_mail_is_delivered_unchanged() {
    timed(60, || {
        let c = clamd();
        let up = Upstream::start();
        let p = clam_proxy(&up, &format!("CLAMD_ADDRESS=127.0.0.1:{}", c.scanner.port));
        let sent = ham_message();
        let (code, text) = send(&p, &sent);
        assert_eq!(code, 250, "clean mail: {text}");
        assert_bytes_eq!(delivered_one(&up), sent, "clean mail");
    });
}

#[test]
fn clam_clamd_down_defers_by_default() {
    timed(60, || {
        require("clamdscan", "clamdscan");
        let missing = std::env::temp_dir().join("proxsmtpd-no-such-clamd.sock");
        for address in [
            format!("127.0.0.1:{}", closed_port()),
            missing.display().to_string(),
        ] {
            let up = Upstream::start();
            let p = clam_proxy(&up, &format!("CLAMD_ADDRESS={address}"));
            let (code, text) = send(&p, &ham_message());
            assert_eq!(code, 451, "clamd down at {address}: {text}");
            assert!(text.contains("Virus scanner unavailable"), "{text}");
            assert_nothing_delivered(&up, &p);
        }
    });
}

#[test]
fn clam_clamd_down_with_fail_open_delivers_unscanned() {
    timed(60, || {
        require("clamdscan", "clamdscan");
        let up = Upstream::start();
        let p = clam_proxy(
            &up,
            &format!("CLAMD_ADDRESS=127.0.0.1:{} FAIL_OPEN=1", closed_port()),
        );
        let sent = ham_message();
        let (code, text) = send(&p, &sent);
        assert_eq!(code, 250, "clamd down, fail open: {text}");
        assert_bytes_eq!(delivered_one(&up), sent, "clamd down, fail open");
    });
}

#[test]
fn clam_clamdscan_error_comes_before_the_smtp_reply_on_stderr() {
    timed(60, || {
        require("clamdscan", "clamdscan");
        let email = write_temp(&ham_message());
        let out = common::command(filter("clamav.sh"))
            .env("EMAIL", email.path())
            .env("CLAMD_ADDRESS", format!("127.0.0.1:{}", closed_port()))
            .stdin(Stdio::null())
            .output()
            .expect("run clamav.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            lines.last().copied(),
            Some("451 4.3.0 Virus scanner unavailable, try again later"),
            "{stderr}"
        );
        assert!(
            lines[..lines.len() - 1]
                .iter()
                .any(|l| l.contains("Could not connect to clamd")),
            "clamdscan's error is not shown: {stderr}"
        );
    });
}
