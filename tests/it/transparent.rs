//! Transparent proxying, `TransparentProxy: client` and `full`, in a private network of
//! namespaces that `scripts/netns-transparent.sh` builds: a client (10.77.1.2) sends mail to
//! an MTA (10.77.2.2:25); the gateway between them intercepts the connection and hands it
//! to the real binary running inside the gateway's namespace.
//!
//! - client mode: the message arrives, the filter's SERVER is the original destination and
//!   the MTA sees the gateway (10.77.2.1) as its peer;
//! - full mode: the MTA sees the client's own address as its peer;
//! - both: a connection whose original destination is the client's own address is closed
//!   (loop) and never reaches the MTA;
//! - both again after `User: nobody` (full mode needs CAP_NET_ADMIN after the switch).
//!
//! The MTA is the harness upstream: this test binary, run again inside the MTA's namespace
//! as the ignored test `transparent::mta`. The client is a small Python program written by
//! the test. Each test builds
//! its own namespaces under a unique prefix and removes them when it ends, also on failure.
//! Without root, `ip`, `iptables` or `python3` every test prints a note and returns.

use crate::common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;

use crate::common::{secs, timed, wait_for, wait_until, Upstream};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-transparent.sh");
const CLIENT_IP: &str = "10.77.1.2";
const GW_CLIENT_IP: &str = "10.77.1.1";
const GW_MTA_IP: &str = "10.77.2.1";
const MTA_IP: &str = "10.77.2.2";
const NOBODY: &str = "65534";

/// The client. `send HOST PORT SUBJECT` sends one message and prints `greeting CODE`,
/// then `sent` or `error ...`; `probe HOST PORT` prints `closed` or `open` with whatever
/// the server said before closing (or before 20 s passed).
const CLIENT_PY: &str = r#"import smtplib, socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "send":
    msg = ("From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: %s\r\n\r\n"
           "Hello through the gateway.\r\n" % sys.argv[4])
    try:
        s = smtplib.SMTP(timeout=20)
        code, _ = s.connect(host, port)
        print("greeting %d" % code)
        s.ehlo("client.test")
        s.sendmail("alice@example.org", ["bob@example.net"], msg)
        print("sent")
        s.quit()
    except Exception as e:
        print("error %r" % e)
else:
    c = socket.create_connection((host, port), timeout=20)
    data = b""
    try:
        while True:
            d = c.recv(4096)
            if not d:
                break
            data += d
        print("closed %r" % data)
    except socket.timeout:
        print("open %r" % data)
"#;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Client,
    Full,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Client => "client",
            Mode::Full => "full",
        }
    }

    /// The port the script sends intercepted connections to.
    fn port(self) -> u16 {
        match self {
            Mode::Client => 10025,
            Mode::Full => 10026,
        }
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The Python interpreter, when everything the tests need is there; otherwise a note.
fn prerequisites() -> Option<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        skip!("not running as root; transparent proxy test skipped");
        return None;
    }
    for tool in ["ip", "iptables"] {
        if find_in_path(tool).is_none() {
            skip!("`{tool}` not found; transparent proxy test skipped");
            return None;
        }
    }
    let python = find_in_path("python3");
    if python.is_none() {
        skip!("`python3` not found; transparent proxy test skipped");
    }
    python
}

/// A unique name prefix per test and process, so that parallel runs never share a
/// namespace.
fn prefix(tag: &str) -> String {
    format!("px{}{tag}", std::process::id() % 100_000)
}

fn script(prefix: &str, mode: Mode, action: &str) -> std::process::Output {
    common::command("bash")
        .args([SCRIPT, "-p", prefix, "-m", mode.name(), action])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {SCRIPT}: {e}"))
}

/// The namespaces of one test; removed on drop (with everything still running inside).
struct Net {
    prefix: String,
    mode: Mode,
}

impl Net {
    fn up(tag: &str, mode: Mode) -> Net {
        let prefix = prefix(tag);
        // Left over from an earlier run that was killed.
        script(&prefix, mode, "down");
        let out = script(&prefix, mode, "up");
        assert!(
            out.status.success(),
            "netns-transparent.sh up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Net { prefix, mode }
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn status(&self) -> String {
        let out = script(&self.prefix, self.mode, "status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let out = script(&self.prefix, self.mode, "down");
        if !out.status.success() {
            eprintln!(
                "netns-transparent.sh down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A program running inside a namespace, in its own process group; killed on drop.
struct Process {
    child: Child,
}

impl Process {
    fn spawn(ns: &str, argv: &[&str], log: &Path) -> Process {
        Process::spawn_with(ns, argv, log, &[])
    }

    fn spawn_with(ns: &str, argv: &[&str], log: &Path, env: &[(&str, &str)]) -> Process {
        let log = fs::File::create(log).expect("log file");
        let child = common::command("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?} in {ns}: {e}"));
        common::register_process_group(child.id() as i32);
        Process { child }
    }

    /// The pid of the program itself: `ip netns exec` execs it.
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let pgid = self.pid();
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        let _ = self.child.wait();
        common::unregister_process_group(pgid);
    }
}

/// True if `pid` has a TCP socket listening on `port` in its network namespace.
fn listens(pid: i32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|text| {
        text.lines().skip(1).any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
        })
    })
}

/// A field of /proc/PID/status, whitespace normalised.
fn status_field(pid: i32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default()
}

/// The whole setup: namespaces, the MTA, and the proxy in the gateway. Fields drop in
/// order: the programs first, then the namespaces, then the files.
struct Lab {
    proxy: Process,
    _mta: Process,
    net: Net,
    python: PathBuf,
    dir: TempDir,
}

impl Lab {
    /// Starts everything; `settings` are added to the proxy's configuration.
    fn start(python: PathBuf, tag: &str, mode: Mode, settings: &[(&str, &str)]) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("proxsmtpd-transparent.")
            .tempdir()
            .expect("tempdir");
        // The proxy may run as nobody: it needs to reach TempDirectory and the filter's
        // output directory.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["tmp", "out", "mta"] {
            let d = dir.path().join(sub);
            fs::create_dir(&d).expect("mkdir");
            fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).expect("chmod");
        }
        fs::write(dir.path().join("client.py"), CLIENT_PY).expect("write client");

        let net = Net::up(tag, mode);
        let path = |name: &str| dir.path().join(name).display().to_string();
        let exe = std::env::current_exe().expect("test binary");
        let exe = exe.display().to_string();
        let mta = Process::spawn_with(
            &net.ns("mta"),
            &[
                &exe,
                "--exact",
                "transparent::mta",
                "--ignored",
                "--nocapture",
            ],
            &dir.path().join("mta.log"),
            &[(MTA_DIR_VAR, &path("mta"))],
        );
        assert!(
            wait_until(secs(10), || dir.path().join("mta/ready").exists()),
            "the MTA did not start: {}",
            fs::read_to_string(dir.path().join("mta.log")).unwrap_or_default()
        );

        let mut config = format!(
            "Listen: 0.0.0.0:{}\nTransparentProxy: {}\nTempDirectory: {}\nTimeOut: 20\n\
             FilterTimeout: 10\nFilterCommand: env > {}/env.$$; cat\n",
            mode.port(),
            mode.name(),
            path("tmp"),
            path("out"),
        );
        for (name, value) in settings {
            config.push_str(&format!("{name}: {value}\n"));
        }
        fs::write(dir.path().join("proxsmtpd.conf"), &config).expect("write config");
        let bin = common::binary().display().to_string();
        let mut proxy = Process::spawn(
            &net.ns("gw"),
            &[&bin, "-d", "4", "-f", &path("proxsmtpd.conf")],
            &dir.path().join("proxy.log"),
        );
        let up = wait_until(secs(10), || {
            listens(proxy.pid(), mode.port()) || !proxy.alive()
        });
        let lab = Lab {
            proxy,
            _mta: mta,
            net,
            python,
            dir,
        };
        assert!(
            up && lab.proxy_alive(),
            "the proxy did not start listening; config:\n{config}"
        );
        lab
    }

    fn proxy_alive(&self) -> bool {
        // `alive` reaps; a signal 0 probe does not need `&mut`.
        nix::sys::signal::kill(Pid::from_raw(self.proxy.pid()), None).is_ok()
            && !status_field(self.proxy.pid(), "State").starts_with('Z')
    }

    fn file(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn proxy_log(&self) -> String {
        self.file("proxy.log")
    }

    /// Runs the Python client in namespace `role` and returns what it printed.
    fn client(&self, role: &str, args: &[&str]) -> String {
        let log = self.dir.path().join(format!("client-{}.log", args[0]));
        let script = self.dir.path().join("client.py").display().to_string();
        let python = self.python.display().to_string();
        let mut argv = vec![python.as_str(), script.as_str()];
        argv.extend_from_slice(args);
        let mut p = Process::spawn(&self.net.ns(role), &argv, &log);
        // The client gives up by itself after 20 s; the test's own limit covers the rest.
        wait_until(secs(60), || !p.alive());
        fs::read_to_string(&log).unwrap_or_default()
    }

    /// Sends a message from the client namespace to the MTA's address.
    fn send(&self, subject: &str) -> String {
        self.client("client", &["send", MTA_IP, "25", subject])
    }

    /// Connects from inside the gateway to the gateway's own address, port 25, which the
    /// script redirects to the proxy: original destination == client address.
    fn probe_loop(&self) -> String {
        self.client("gw", &["probe", GW_CLIENT_IP, "25"])
    }

    fn mta_events(&self) -> Vec<String> {
        self.file("mta/events").lines().map(String::from).collect()
    }

    /// Waits for the MTA to receive a message containing `needle`; returns the peer the
    /// MTA saw.
    fn wait_message(&self, needle: &str) -> String {
        wait_for(secs(10), || {
            self.mta_events().iter().find_map(|e| {
                let rest = e.strip_prefix("message ")?;
                let (peer, file) = rest.split_once(' ')?;
                fs::read_to_string(file)
                    .ok()?
                    .contains(needle)
                    .then(|| peer.to_string())
            })
        })
        .unwrap_or_else(|| panic!("no message with {needle:?} at the MTA"))
    }

    /// The environments the filter ran with.
    fn filter_envs(&self) -> Vec<HashMap<String, String>> {
        let out = self.dir.path().join("out");
        let mut files: Vec<PathBuf> = fs::read_dir(&out)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|f| {
                fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    /// Mail goes through; returns the peer the MTA saw. Also checks the filter's view.
    fn deliver(&self, subject: &str) -> String {
        let out = self.send(subject);
        assert!(out.contains("sent"), "client: {out}");
        let peer = self.wait_message(subject);
        let envs = self.filter_envs();
        assert_eq!(envs.len(), 1, "filter runs: {envs:?}");
        let var = |k: &str| envs[0].get(k).map(String::as_str);
        assert_eq!(var("CLIENT"), Some(CLIENT_IP), "filter CLIENT");
        assert_eq!(var("SERVER"), Some(MTA_IP), "filter SERVER");
        peer
    }

    /// A connection whose original destination is its own source is closed without a
    /// session, and nothing reaches the MTA.
    fn assert_loop_refused(&self) {
        let connections_before = self.connections();
        let out = self.probe_loop();
        assert!(out.starts_with("closed"), "loop probe: {out}");
        // Closed at once, or after a 4xx saying the upstream is unavailable.
        assert!(
            out.starts_with("closed b''") || out.starts_with("closed b'421"),
            "loop probe: {out}"
        );
        assert!(
            wait_until(secs(5), || self
                .proxy_log()
                .contains("loop detected in transparent proxying")),
            "no loop in the proxy log"
        );
        assert_eq!(
            self.connections(),
            connections_before,
            "the MTA was reached"
        );
    }

    fn connections(&self) -> usize {
        self.mta_events()
            .iter()
            .filter(|e| e.starts_with("connect "))
            .count()
    }

    fn assert_runs_as_nobody(&self) {
        let pid = self.proxy.pid();
        assert!(
            wait_until(secs(5), || status_field(pid, "Uid").starts_with(NOBODY)),
            "uid not switched: {}",
            status_field(pid, "Uid")
        );
        assert_eq!(status_field(pid, "Uid"), [NOBODY; 4].join(" "));
        assert_eq!(status_field(pid, "Gid"), [NOBODY; 4].join(" "));
        let groups = status_field(pid, "Groups");
        assert!(
            groups.split(' ').all(|g| g.is_empty() || g == NOBODY),
            "supplementary groups kept: {groups:?}"
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- proxy log ----\n{}---- MTA events ----\n{}---- MTA log ----\n{}\
                 ---- network ----\n{}----",
                self.proxy_log(),
                self.file("mta/events"),
                self.file("mta.log"),
                self.net.status()
            );
        }
    }
}

#[test]
fn client_mode_relays_to_the_original_destination() {
    timed(90, || {
        let Some(python) = prerequisites() else {
            return;
        };
        let lab = Lab::start(python, "c", Mode::Client, &[]);
        // The proxy connects from its own address on the MTA's side.
        assert_eq!(
            lab.deliver("client-mode"),
            GW_MTA_IP,
            "peer seen by the MTA"
        );
        lab.assert_loop_refused();
    });
}

#[test]
fn full_mode_connects_from_the_client_address() {
    timed(90, || {
        let Some(python) = prerequisites() else {
            return;
        };
        let lab = Lab::start(python, "f", Mode::Full, &[]);
        assert_eq!(lab.deliver("full-mode"), CLIENT_IP, "peer seen by the MTA");
        lab.assert_loop_refused();
    });
}

#[test]
fn client_mode_as_nobody() {
    timed(90, || {
        let Some(python) = prerequisites() else {
            return;
        };
        let lab = Lab::start(python, "cu", Mode::Client, &[("User", "nobody")]);
        lab.assert_runs_as_nobody();
        assert_eq!(
            lab.deliver("client-nobody"),
            GW_MTA_IP,
            "peer seen by the MTA"
        );
    });
}

#[test]
fn full_mode_as_nobody_keeps_the_client_address() {
    // Binding the upstream socket to the client's address needs CAP_NET_ADMIN, which the
    // original keeps across the switch to User.
    timed(90, || {
        let Some(python) = prerequisites() else {
            return;
        };
        let lab = Lab::start(python, "fu", Mode::Full, &[("User", "nobody")]);
        lab.assert_runs_as_nobody();
        assert_eq!(
            lab.deliver("full-nobody"),
            CLIENT_IP,
            "peer seen by the MTA"
        );
    });
}

/// Where [`mta`] writes its events and messages.
const MTA_DIR_VAR: &str = "TRANSPARENT_MTA_DIR";

/// The MTA of the tests above, which run this test binary again inside the MTA's namespace
/// with `TRANSPARENT_MTA_DIR=DIR`: the harness upstream on 10.77.2.2:25, whose connections
/// and messages it writes to `DIR/events` (`connect PEER`, `message PEER FILE`) until it is
/// killed. Without the variable it returns at once.
#[test]
#[ignore = "the MTA of the transparent tests, run by them in its namespace"]
fn mta() {
    let Some(dir) = std::env::var_os(MTA_DIR_VAR).map(PathBuf::from) else {
        return;
    };
    let addr = std::net::SocketAddr::new(MTA_IP.parse().expect("MTA address"), 25);
    let up = Upstream::builder()
        .banner("220 mta.test ESMTP")
        .ehlo_host("mta.test")
        .extensions(&[])
        .listen(addr)
        .start();
    fs::write(dir.join("ready"), "").expect("write ready");
    // Per session: connection written, messages written.
    let mut written: Vec<usize> = Vec::new();
    let mut files = 0;
    loop {
        let mut events = String::new();
        for (i, session) in up.sessions().iter().enumerate() {
            let peer = session.peer.map_or("?".into(), |p| p.ip().to_string());
            if i == written.len() {
                events.push_str(&format!("connect {peer}\n"));
                written.push(0);
            }
            for m in session.delivered().iter().skip(written[i]) {
                files += 1;
                let file = dir.join(format!("message-{files}.eml"));
                fs::write(&file, &m.content).expect("write message");
                events.push_str(&format!("message {peer} {}\n", file.display()));
                written[i] += 1;
            }
        }
        if !events.is_empty() {
            use std::io::Write;
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("events"))
                .and_then(|mut f| f.write_all(events.as_bytes()))
                .expect("write events");
        }
        thread::sleep(common::ms(20));
    }
}
