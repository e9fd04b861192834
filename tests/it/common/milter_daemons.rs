//! Real milters from the Debian packages, each started for one test on a loopback port of
//! its own, in a temp dir with a configuration written here (never the packages' system
//! services, nothing downloaded):
//!
//! - [`rspamd`]: the proxy worker in milter mode scanning by itself (`self_scan`), no redis,
//!   no DNS, the `milter_headers` module adding its headers to every message;
//! - [`clamav`]: clamd with a one-signature database (the EICAR test string) on a unix
//!   socket, and clamav-milter in front of it rejecting what clamd finds;
//! - [`opendkim`]: a signer for `example.org` with a key generated for the test;
//! - [`spamass`]: spamd (local tests only) and spamass-milter asking it through spamc.
//!
//! Every daemon is started in its own process group, killed with it on drop (and by the
//! test's watchdog), and its log is kept for assertion messages. A missing program is a
//! missing prerequisite: the starter returns `None` after [`super::skipped`] (which fails
//! the test under `PROXSMTPD_TEST_STRICT=1`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::proxy::{free_port, is_listening};
use super::samples::{eicar, spamd_answers, spamd_args, EICAR_SIGNATURE};
use super::secs;

/// The signing domain and selector of [`opendkim`].
pub const DKIM_DOMAIN: &str = "example.org";
pub const DKIM_SELECTOR: &str = "test";

/// The full path of an installed program, or `None` after recording the missing
/// prerequisite (a failure under `PROXSMTPD_TEST_STRICT=1`).
pub fn require(program: &str, package: &str) -> Option<PathBuf> {
    let found = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .map(|dir| Path::new(dir).join(program))
    .find(|p| p.is_file());
    if found.is_none() {
        super::skipped(&format!(
            "{program} is not installed: this test needs the Debian package {package} \
             (scripts/install-test-deps.sh installs it)"
        ));
    }
    found
}

/// One daemon process (and everything it forks: its process group).
struct Process {
    name: &'static str,
    child: Child,
    pgid: i32,
    log: PathBuf,
}

impl Process {
    /// Starts `program args` in `dir`, its stdout and stderr in `dir/<name>.log`.
    fn spawn(name: &'static str, program: &Path, args: &[String], dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = super::command(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let pgid = child.id() as i32;
        super::register_process_group(pgid);
        Process {
            name,
            child,
            pgid,
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` holds; panics with the log if the process exits first or the
    /// limit passes. Returns how long it took.
    fn wait_ready(&mut self, limit: Duration, mut ready: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if ready() {
                return start.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited during start-up ({status}); its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                start.elapsed() < limit,
                "{} not ready after {} s; its log:\n{}",
                self.name,
                limit.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        let _ = self.child.wait();
        super::unregister_process_group(self.pgid);
    }
}

/// A running milter: the address to put in `Milters` (`inet:127.0.0.1:port`) and the
/// processes behind it (the milter last).
pub struct MilterDaemon {
    pub port: u16,
    /// How long the start took, from the first spawn to the milter's socket listening.
    pub startup: Duration,
    processes: Vec<Process>,
    dir: TempDir,
}

impl MilterDaemon {
    /// The milter's socket in the `Milters` syntax.
    pub fn address(&self) -> String {
        format!("inet:127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The logs of every process, for assertion messages.
    pub fn logs(&self) -> String {
        self.processes
            .iter()
            .map(|p| format!("---- {} ----\n{}", p.name, p.log()))
            .collect()
    }

    /// True while every process of the daemon is running.
    pub fn alive(&mut self) -> bool {
        self.processes
            .iter_mut()
            .all(|p| matches!(p.child.try_wait(), Ok(None)))
    }
}

impl Drop for MilterDaemon {
    fn drop(&mut self) {
        // The milter first, then what it depends on.
        while let Some(p) = self.processes.pop() {
            drop(p);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn temp_dir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    // Daemons that drop privileges when started as root must still reach their files.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn waited(name: &str, took: Duration) -> Duration {
    eprintln!("{name} ready after {} ms", took.as_millis());
    took
}

// ---------------------------------------------------------------------------------------
// rspamd

/// rspamd's proxy worker as a milter, scanning by itself. Only the `milter_headers` module
/// is configured (every other Lua module stays off, being unconfigured), DNS goes to a
/// closed loopback port, and the public suffix list is a few lines (the full one takes
/// seconds to compile at every start). GTUBE is recognised by rspamd's core and rejected.
pub fn rspamd() -> Option<MilterDaemon> {
    let program = require("rspamd", "rspamd")?;
    let dir = temp_dir("proxsmtpd-rspamd.");
    let d = dir.path();
    let port = free_port();
    let db = d.join("db");
    fs::create_dir(&db).expect("db dir");
    write(&d.join("tld.dat"), "com\nnet\norg\nexample\n");
    let conf = d.join("rspamd.conf");
    write(
        &conf,
        &format!(
            r#"options {{
  filters = "";
  url_tld = "{tld}";
  cache_file = "{db}/symbols.cache";
  dynamic_conf = "{db}/rspamd_dynamic";
  history_file = "{db}/rspamd.history";
  control_socket = "{db}/rspamd.sock mode=0600";
  hs_cache_dir = "{db}/";
  stats_file = "{db}/stats.ucl";
  tempdir = "{db}";
  dns {{ nameserver = ["127.0.0.1:{dns}"]; timeout = 200ms; retransmits = 0; }}
}}
.include "$CONFDIR/actions.conf"
modules {{ path = "${{PLUGINSDIR}}"; }}
milter_headers {{
  use = ["x-spamd-result", "x-spam-status", "authentication-results"];
  skip_local = false;
  skip_authenticated = false;
}}
logging {{ type = "console"; level = "info"; }}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{port}";
  milter = yes;
  self_scan = yes;
  count = 1;
  timeout = 20s;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
"#,
            tld = d.join("tld.dat").display(),
            db = db.display(),
            dns = free_port(),
        ),
    );
    let var = |name: &str| ["--var".to_string(), format!("{name}={}", db.display())];
    let mut args = vec![
        // In the foreground; as root, workers run as root (the test's temp dir is theirs).
        "-f".to_string(),
        "-i".to_string(),
        "-c".to_string(),
        conf.display().to_string(),
    ];
    for name in ["DBDIR", "RUNDIR", "LOGDIR"] {
        args.extend(var(name));
    }
    let mut p = Process::spawn("rspamd", &program, &args, d);
    let startup = waited("rspamd", p.wait_ready(secs(60), || is_listening(port)));
    Some(MilterDaemon {
        port,
        startup,
        processes: vec![p],
        dir,
    })
}

// ---------------------------------------------------------------------------------------
// clamd and clamav-milter

/// clamd (one custom signature: the EICAR string anywhere, so also in a decoded MIME part)
/// on a unix socket, and clamav-milter in front of it: infected mail is rejected, clean
/// mail gets `X-Virus-Scanned` and `X-Virus-Status` (replacing any the message had).
pub fn clamav() -> Option<MilterDaemon> {
    let clamd = require("clamd", "clamav-daemon")?;
    let milter = require("clamav-milter", "clamav-milter")?;
    let dir = temp_dir("proxsmtpd-clamav.");
    let d = dir.path();
    let db = d.join("db");
    let tmp = d.join("tmp");
    fs::create_dir(&db).expect("db dir");
    fs::create_dir(&tmp).expect("tmp dir");
    let hex: String = eicar().bytes().map(|b| format!("{b:02x}")).collect();
    write(
        &db.join("test.ndb"),
        &format!("{EICAR_SIGNATURE}:0:*:{hex}\n"),
    );
    let socket = d.join("clamd.sock");
    let clamd_conf = d.join("clamd.conf");
    write(
        &clamd_conf,
        &format!(
            "Foreground yes\nDatabaseDirectory {}\nTemporaryDirectory {}\nLocalSocket {}\n\
             LogSyslog no\nLogTime yes\nLogVerbose yes\n",
            db.display(),
            tmp.display(),
            socket.display()
        ),
    );
    let port = free_port();
    let milter_conf = d.join("clamav-milter.conf");
    write(
        &milter_conf,
        &format!(
            "MilterSocket inet:{port}@127.0.0.1\nClamdSocket unix:{}\nForeground yes\n\
             TemporaryDirectory {}\nOnInfected Reject\nOnFail Defer\nAddHeader Replace\n\
             LogSyslog no\nLogVerbose yes\nLogInfected Full\nLogClean Full\n\
             PidFile {}\n",
            socket.display(),
            tmp.display(),
            d.join("clamav-milter.pid").display()
        ),
    );
    let start = Instant::now();
    let mut daemon = Process::spawn(
        "clamd",
        &clamd,
        &["-c".to_string(), clamd_conf.display().to_string()],
        d,
    );
    waited(
        "clamd",
        daemon.wait_ready(secs(60), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        }),
    );
    let mut m = Process::spawn(
        "clamav-milter",
        &milter,
        &["-c".to_string(), milter_conf.display().to_string()],
        d,
    );
    waited(
        "clamav-milter",
        m.wait_ready(secs(30), || is_listening(port)),
    );
    Some(MilterDaemon {
        port,
        startup: start.elapsed(),
        processes: vec![daemon, m],
        dir,
    })
}

// ---------------------------------------------------------------------------------------
// opendkim

/// opendkim signing mail from `example.org` (the `From:` domain decides) with selector
/// `test`, a 2048-bit key generated for this daemon, and `canonicalization`
/// (`relaxed/relaxed`, the usual one, or `simple/simple`, under which the signature only
/// verifies if every signed header field and the body reach the recipient byte for byte). Mail counts as ours when the
/// client is on loopback (`InternalHosts`). [`MilterDaemon::dir`] holds `test.private`
/// and the TXT record's text, see [`dkim_txt_record`].
pub fn opendkim(canonicalization: &str) -> Option<MilterDaemon> {
    let program = require("opendkim", "opendkim")?;
    let genkey = require("opendkim-genkey", "opendkim-tools")?;
    let dir = temp_dir("proxsmtpd-opendkim.");
    let d = dir.path();
    let out = super::command(&genkey)
        .args(["-b", "2048", "-d", DKIM_DOMAIN, "-s", DKIM_SELECTOR, "-D"])
        .arg(d)
        .output()
        .expect("run opendkim-genkey");
    assert!(
        out.status.success(),
        "opendkim-genkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let conf = d.join("opendkim.conf");
    write(
        &conf,
        &format!(
            "Mode s\nDomain {DKIM_DOMAIN}\nSelector {DKIM_SELECTOR}\nKeyFile {}\n\
             Socket inet:{port}@127.0.0.1\nCanonicalization {canonicalization}\n\
             InternalHosts 127.0.0.1,::1\nSyslog no\nRequireSafeKeys no\n\
             PidFile {}\n",
            d.join(format!("{DKIM_SELECTOR}.private")).display(),
            d.join("opendkim.pid").display()
        ),
    );
    let mut p = Process::spawn(
        "opendkim",
        &program,
        &[
            "-f".to_string(),
            "-x".to_string(),
            conf.display().to_string(),
        ],
        d,
    );
    let startup = waited("opendkim", p.wait_ready(secs(30), || is_listening(port)));
    Some(MilterDaemon {
        port,
        startup,
        processes: vec![p],
        dir,
    })
}

/// The text of the DKIM key's TXT record (`v=DKIM1; k=rsa; p=...`), from the zone file
/// opendkim-genkey wrote next to the key: the quoted strings of the record, joined.
pub fn dkim_txt_record(dkim: &MilterDaemon) -> String {
    let zone = fs::read_to_string(dkim.dir().join(format!("{DKIM_SELECTOR}.txt")))
        .expect("opendkim-genkey's TXT record");
    zone.split('"').skip(1).step_by(2).collect()
}

// ---------------------------------------------------------------------------------------
// spamd and spamass-milter

/// spamd on loopback (local tests only: no DNS blocklists; no Bayes; a site configuration
/// of our own with the installed rules) and spamass-milter asking it through spamc,
/// rejecting mail scored `reject_score` or more and adding `X-Spam-*` headers.
pub fn spamass(reject_score: u32) -> Option<MilterDaemon> {
    let spamd = require("spamd", "spamd")?;
    let spamc = require("spamc", "spamc")?;
    let milter = require("spamass-milter", "spamass-milter")?;
    let dir = temp_dir("proxsmtpd-spamass.");
    let d = dir.path();
    let spamd_port = free_port();
    let spamd_args = spamd_args(d, spamd_port, (1, 2)).expect("spamd configuration");
    let start = Instant::now();
    let mut daemon = Process::spawn("spamd", &spamd, &spamd_args, d);
    let ping = || spamd_answers(&spamc, spamd_port);
    waited("spamd", daemon.wait_ready(secs(90), ping));
    let port = free_port();
    let milter_args: Vec<String> = vec![
        "-p".into(),
        format!("inet:{port}@127.0.0.1"),
        "-r".into(),
        reject_score.to_string(),
        // The rest goes to spamc: our spamd.
        "--".into(),
        "-d".into(),
        "127.0.0.1".into(),
        "-p".into(),
        spamd_port.to_string(),
    ];
    let mut m = Process::spawn("spamass-milter", &milter, &milter_args, d);
    waited(
        "spamass-milter",
        m.wait_ready(secs(30), || is_listening(port)),
    );
    Some(MilterDaemon {
        port,
        startup: start.elapsed(),
        processes: vec![daemon, m],
        dir,
    })
}
