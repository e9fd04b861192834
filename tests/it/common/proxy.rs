//! Starts the binary under test: writes a `proxsmtpd.conf` into a fresh temp dir, picks a
//! free port, runs `BIN -d 4 -f conf -p pidfile` in its own process group with stdout and
//! stderr captured to a file, waits until the port is in LISTEN state (read from
//! /proc/net/tcp, so probing opens no SMTP session), and stops it on drop (SIGTERM, then
//! SIGKILL to the whole group).
//!
//! Also: filter script helpers, a filter that records its environment and input, and
//! TempDirectory checks.

use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::client::Client;
use super::upstream::Upstream;

/// The environment given to the proxy (and so inherited by filters): nothing from the test
/// runner leaks in, so `PROXSMTPD_*` variables of the caller cannot change a test.
const BASE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
    ("LANG", "C"),
];

/// Ports handed out by `free_port` lie below the kernel's ephemeral range (32768 and up
/// here), so that neither another test's `bind(0)` nor the source port of an outgoing
/// connection can take a port between the moment a test picks it and the moment its
/// daemon binds it; one counter for the whole test binary means no two tests get the same
/// one. The start depends on the process id so that consecutive runs do not reuse ports
/// their predecessors' sockets may still hold.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// A TCP port on 127.0.0.1 that nothing listens on and that no other test of this binary
/// will be given.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % u32::from(span)) as u16 + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = PORT_RANGE.start + n % span;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && !is_listening(port) {
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}")
}

/// True if something listens on `port` (any local address), per /proc/net/tcp{,6}.
pub fn is_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).is_ok_and(|text| {
            text.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
        })
    })
}

/// True if process `pid` itself holds a socket listening on `port` (so a port that another
/// process grabbed in the meantime does not count as ours).
pub fn pid_listens_on(pid: i32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    (cols.len() > 9 && cols[1].ends_with(&want) && cols[3] == "0A")
                        .then(|| format!("socket:[{}]", cols[9]))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .filter_map(|e| fs::read_link(e.path()).ok())
            .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// True if `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Runs the binary with `args` (no config generated) and waits at most `timeout`.
/// Returns `None` (after killing it) if it was still running then.
pub fn run_binary(bin: &Path, args: &[&str], timeout: Duration) -> Option<Output> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = super::command(bin)
        .args(args)
        .env_clear()
        .envs(BASE_ENV.iter().copied())
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let pgid = child.id() as i32;
    super::register_process_group(pgid);
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        // Only on overrun: a process that daemonised must survive its parent's exit.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        let _ = child.wait();
    }
    super::unregister_process_group(pgid);
    let status = status?;
    Some(Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    })
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Configures and starts a proxy.
pub struct ProxyBuilder {
    dir: TempDir,
    bin: PathBuf,
    settings: Vec<(String, String)>,
    raw: String,
    env: Vec<(String, String)>,
    name: String,
    listen_ip: IpAddr,
    wrapper: Vec<String>,
    debug_level: u8,
}

impl Default for ProxyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyBuilder {
    /// A fresh temp dir (with `tmp/` as TempDirectory and `out/` for filter records),
    /// TimeOut 20 and FilterTimeout 10.
    pub fn new() -> ProxyBuilder {
        let dir = tempfile::Builder::new()
            .prefix("proxsmtpd-test.")
            .tempdir()
            .expect("tempdir");
        fs::create_dir(dir.path().join("tmp")).expect("tmp dir");
        fs::create_dir(dir.path().join("out")).expect("out dir");
        let tmp = dir.path().join("tmp").display().to_string();
        ProxyBuilder {
            dir,
            bin: super::binary(),
            settings: Vec::new(),
            raw: String::new(),
            env: Vec::new(),
            name: "proxy".into(),
            listen_ip: IpAddr::from([127, 0, 0, 1]),
            wrapper: Vec::new(),
            debug_level: 4,
        }
        .set("TempDirectory", &tmp)
        .set("TimeOut", "20")
        .set("FilterTimeout", "10")
    }

    /// The `-d` level (4 unless set; the soak logs less).
    pub fn debug_level(mut self, level: u8) -> Self {
        self.debug_level = level;
        self
    }

    /// Use another binary (differential tests).
    pub fn binary(mut self, bin: &Path) -> Self {
        self.bin = bin.to_path_buf();
        self
    }

    pub fn upstream(self, up: &Upstream) -> Self {
        let a = up.out_address();
        self.set("OutAddress", &a)
    }

    /// Sets a config value (replacing an earlier one).
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.settings.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    pub fn unset(mut self, name: &str) -> Self {
        self.settings.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self
    }

    /// Text appended to the generated config verbatim (grammar tests).
    pub fn raw(mut self, text: &str) -> Self {
        self.raw.push_str(text);
        self
    }

    /// An environment variable for the proxy process (and so its filters).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Listen on this loopback address instead of 127.0.0.1 (e.g. `::1`).
    pub fn listen_ip(mut self, ip: IpAddr) -> Self {
        self.listen_ip = ip;
        self
    }

    /// Start the binary through a program that execs it (e.g. `setpriv --groups 4 --`).
    pub fn wrapper(mut self, argv: &[&str]) -> Self {
        self.wrapper = argv.iter().map(|s| s.to_string()).collect();
        self
    }

    /// A name for the files of this proxy (`<name>.conf`, `.pid`, `.log`).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    pub fn out_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Writes an executable script into the temp dir and returns its path. Scripts without
    /// a `#!` line get `#!/bin/sh`. `{OUT}` in the text is replaced by the out dir.
    pub fn script(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        let mut body = text.replace("{OUT}", &self.out_dir().display().to_string());
        if !body.starts_with("#!") {
            body = format!("#!/bin/sh\n{body}");
        }
        fs::write(&p, body).expect("write script");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod script");
        p.display().to_string()
    }

    /// Wraps a filter command so that each run is counted (see [`Proxy::filter_runs`]).
    pub fn counted(&self, cmd: &str) -> String {
        format!("echo run >> {}/runs; {cmd}", self.out_dir().display())
    }

    /// A filter that records its environment, its stdin (pipe mode) or `$EMAIL` (file
    /// mode), then passes the message through unchanged.
    pub fn env_recorder(&self) -> (String, EnvRecorder) {
        let rec = self.out_dir().join("env");
        fs::create_dir_all(&rec).expect("env dir");
        let script = self.script(
            "record-env.sh",
            &format!(
                r#"d=$(mktemp -d "{rec}/run.$(date +%s%N).XXXXXX") || exit 75
env -0 > "$d/env"
pwd > "$d/cwd"
if [ -n "${{EMAIL+x}}" ]; then
  cp "$EMAIL" "$d/email" 2>/dev/null
  stat -c %a "$EMAIL" > "$d/email_mode" 2>/dev/null
else
  cat > "$d/stdin"
  cat "$d/stdin"
fi
: > "$d/done"
"#,
                rec = rec.display()
            ),
        );
        (script, EnvRecorder { dir: rec })
    }

    pub fn config_text(&self) -> String {
        let mut s = String::from("# generated by the proxsmtpd integration tests\n");
        for (k, v) in &self.settings {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s.push_str(&self.raw);
        s
    }

    /// Starts the proxy and waits until it listens; panics with its log otherwise.
    pub fn start(self) -> Proxy {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(mut self) -> Result<Proxy, String> {
        let mut last = String::new();
        for _attempt in 0..4 {
            let port = free_port();
            let listen = SocketAddr::new(self.listen_ip, port);
            self = self.set("Listen", &listen.to_string());
            let conf_path = self.dir.path().join(format!("{}.conf", self.name));
            let pid_path = self.dir.path().join(format!("{}.pid", self.name));
            let log_path = self.dir.path().join(format!("{}.log", self.name));
            fs::write(&conf_path, self.config_text()).expect("write config");
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("log file");
            let mut cmd = match self.wrapper.split_first() {
                Some((prog, args)) => {
                    let mut c = super::command(prog);
                    c.args(args).arg(&self.bin);
                    c
                }
                None => super::command(&self.bin),
            };
            let child = cmd
                .arg("-d")
                .arg(self.debug_level.to_string())
                .arg("-f")
                .arg(&conf_path)
                .arg("-p")
                .arg(&pid_path)
                .env_clear()
                .envs(BASE_ENV.iter().copied())
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log clone"))
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
            let pgid = child.id() as i32;
            super::register_process_group(pgid);
            let mut proxy = Proxy {
                child: Some(child),
                pgid,
                port,
                listen,
                conf_path,
                pid_path,
                log_path,
                extra_pids: Mutex::new(Vec::new()),
                dir: None,
            };
            let up = super::wait_until(Duration::from_secs(10), || {
                pid_listens_on(pgid, port) || !proxy.alive()
            });
            if up && proxy.alive() {
                proxy.dir = Some(self.dir);
                return Ok(proxy);
            }
            proxy.stop();
            last = proxy.log();
            let l = last.to_ascii_lowercase();
            if !(l.contains("bind") || l.contains("in use")) {
                break;
            }
        }
        Err(format!(
            "proxy {} did not start listening; config:\n{}\nlog:\n{last}",
            self.bin.display(),
            self.config_text()
        ))
    }
}

/// What one run of the [`ProxyBuilder::env_recorder`] filter saw.
#[derive(Debug, Clone)]
pub struct FilterRun {
    pub env: HashMap<String, String>,
    pub stdin: Option<Vec<u8>>,
    pub email: Option<Vec<u8>>,
    /// Octal mode of the `$EMAIL` file, e.g. "600".
    pub email_mode: Option<String>,
    pub cwd: String,
}

impl FilterRun {
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(|s| s.as_str())
    }
}

/// Reads the records of the environment recorder filter.
#[derive(Clone)]
pub struct EnvRecorder {
    dir: PathBuf,
}

impl EnvRecorder {
    /// Completed runs, oldest first.
    pub fn runs(&self) -> Vec<FilterRun> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        dirs.sort();
        dirs.into_iter()
            .filter(|d| d.join("done").exists())
            .map(|d| {
                let raw = fs::read(d.join("env")).unwrap_or_default();
                let env = raw
                    .split(|&b| b == 0)
                    .filter(|kv| !kv.is_empty())
                    .filter_map(|kv| {
                        let s = String::from_utf8_lossy(kv);
                        s.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                    })
                    .collect();
                FilterRun {
                    env,
                    stdin: fs::read(d.join("stdin")).ok(),
                    email: fs::read(d.join("email")).ok(),
                    email_mode: fs::read_to_string(d.join("email_mode"))
                        .ok()
                        .map(|s| s.trim().to_string()),
                    cwd: fs::read_to_string(d.join("cwd"))
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                }
            })
            .collect()
    }

    /// Waits for `n` completed runs (panics if fewer) and returns them.
    pub fn wait_runs(&self, n: usize, timeout: Duration) -> Vec<FilterRun> {
        super::wait_until(timeout, || self.runs().len() >= n);
        let runs = self.runs();
        assert_eq!(
            runs.len(),
            n,
            "the recorder filter ran {} times, expected {n}",
            runs.len()
        );
        runs
    }

    /// Waits for exactly one filter run and asserts the envelope it was given.
    pub fn assert_one_envelope(&self, sender: &str, recipients: &str) {
        let run = &self.wait_runs(1, Duration::from_secs(5))[0];
        assert_eq!(run.var("SENDER"), Some(sender), "SENDER");
        assert_eq!(run.var("RECIPIENTS"), Some(recipients), "RECIPIENTS");
    }
}

/// A running proxy; stopped on drop.
pub struct Proxy {
    child: Option<Child>,
    pgid: i32,
    pub port: u16,
    listen: SocketAddr,
    pub conf_path: PathBuf,
    pub pid_path: PathBuf,
    pub log_path: PathBuf,
    extra_pids: Mutex<Vec<i32>>,
    dir: Option<TempDir>,
}

impl Proxy {
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::new()
    }

    /// A proxy in front of `up` with default settings.
    pub fn start(up: &Upstream) -> Proxy {
        ProxyBuilder::new().upstream(up).start()
    }

    /// A proxy in front of `up` with one setting changed from the default.
    pub fn with_setting(up: &Upstream, name: &str, value: &str) -> Proxy {
        ProxyBuilder::new().upstream(up).set(name, value).start()
    }

    /// A proxy in front of `up` that runs `filter` as its FilterCommand.
    pub fn with_filter(up: &Upstream, filter: &str) -> Proxy {
        Proxy::with_setting(up, "FilterCommand", filter)
    }

    /// A proxy in front of `up` that runs `filter` as its FilterCommand, if there is one.
    pub fn with_optional_filter(up: &Upstream, filter: Option<&str>) -> Proxy {
        match filter {
            Some(f) => Proxy::with_filter(up, f),
            None => Proxy::start(up),
        }
    }

    /// A proxy in front of `up` whose filter passes the message on and records its
    /// environment.
    pub fn recording_env(up: &Upstream) -> (Proxy, EnvRecorder) {
        let b = ProxyBuilder::new().upstream(up);
        let (f, rec) = b.env_recorder();
        (b.set("FilterCommand", &f).start(), rec)
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr())
    }

    /// Connects, reads the 220 greeting and sends EHLO.
    pub fn open(&self) -> Client {
        Client::open(self.addr())
    }

    pub fn pid(&self) -> i32 {
        self.pgid
    }

    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir().join("tmp")
    }

    pub fn out_dir(&self) -> PathBuf {
        self.dir().join("out")
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.out_dir().join(name)
    }

    /// Everything the proxy wrote to stdout/stderr.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.log().contains(needle))
    }

    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pgid), sig);
    }

    /// Sends SIGTERM and waits for the exit; `None` if still running after `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.child.as_mut().and_then(|c| wait_child(c, timeout))
    }

    /// How many times a [`ProxyBuilder::counted`] filter ran.
    pub fn filter_runs(&self) -> usize {
        fs::read_to_string(self.out("runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Makes sure a process the test learned about (e.g. a filter that writes its pid) is
    /// killed at the end even if it left the proxy's process group.
    pub fn adopt_pid(&self, pid: i32) {
        self.extra_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pid);
    }

    /// Reads a pid written by a filter into `out/<name>` and adopts it.
    pub fn read_pid(&self, name: &str) -> Option<i32> {
        let pid = fs::read_to_string(self.out(name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        self.adopt_pid(pid);
        Some(pid)
    }

    /// Names of the files in TempDirectory.
    pub fn tmp_files(&self) -> Vec<String> {
        super::file_names(&self.tmp_dir())
    }

    pub fn wait_tmp_clean(&self, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.tmp_files().is_empty())
    }

    pub fn assert_tmp_clean(&self) {
        assert!(
            self.wait_tmp_clean(Duration::from_secs(3)),
            "files left in TempDirectory: {:?}",
            self.tmp_files()
        );
    }

    /// Stops the proxy: SIGTERM, up to 3 s grace, SIGKILL, then SIGKILL to its whole
    /// process group and to adopted pids.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = kill(Pid::from_raw(self.pgid), Signal::SIGTERM);
                if wait_child(&mut child, Duration::from_secs(3)).is_none() {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            super::unregister_process_group(self.pgid);
        }
        for pid in self
            .extra_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            if pid_alive(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!(
                "---- proxy {} config ----\n{}---- proxy log tail ----\n{}\n----",
                self.conf_path.display(),
                fs::read_to_string(&self.conf_path).unwrap_or_default(),
                tail.join("\n")
            );
        }
        if std::env::var_os("PROXSMTPD_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("kept {}", d.keep().display());
            }
        }
    }
}
