//! The real binary as process 1 of its own PID namespace, as it runs as a container's entry
//! point: no orphan of a filter stays a zombie, signals reach the proxy, process 1 exits with
//! the proxy's status and gives what is left in the namespace a SIGTERM when the proxy is gone.
//!
//! The namespace comes from util-linux `unshare --pid --fork --mount-proc` (with
//! `--map-root-user` when not root); where that is refused the tests are skipped with a note.

mod common;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::proxy::free_port;
use common::{
    message, secs, testing_reference, timed, wait_for, wait_until, Client, Daemon, Upstream,
};

/// The `unshare` command line that makes a new PID namespace here, if one can be made.
fn namespace_wrapper() -> Option<Vec<&'static str>> {
    if testing_reference() {
        eprintln!("note: the reference binary has no process-1 mode; skipped");
        return None;
    }
    let mut wrapper = vec!["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];
    if !nix::unistd::geteuid().is_root() {
        wrapper.insert(1, "--map-root-user");
    }
    let works = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!("note: `{}` is refused here; skipped", wrapper.join(" "));
        return None;
    }
    Some(wrapper)
}

/// (pid, state, command name) of the processes whose parent is `ppid`, from /proc.
fn children(ppid: i32) -> Vec<(i32, char, String)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": the name may hold spaces and parentheses.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat[open + 1..close].to_string();
            let mut rest = stat[close + 1..].split_whitespace();
            let state = rest.next()?.chars().next()?;
            let parent: i32 = rest.next()?.parse().ok()?;
            (parent == ppid).then_some((pid, state, comm))
        })
        .collect()
}

/// Every process below `pid`, depth first.
fn descendants(pid: i32) -> Vec<(i32, char, String)> {
    let mut all = Vec::new();
    for child in children(pid) {
        let below = descendants(child.0);
        all.push(child);
        all.extend(below);
    }
    all
}

/// The proxy as process 1 of a new namespace, and the host pids of that process 1.
struct AsProcessOne {
    daemon: Daemon,
    init: i32,
    port: u16,
}

impl AsProcessOne {
    /// Starts `proxsmtpd -d 2 -f CONF` under `wrapper` with `conf` (Listen is added) and
    /// waits until it accepts connections.
    fn start(wrapper: &[&str], dir: &Path, conf: &str) -> AsProcessOne {
        let port = free_port();
        let conf_path = dir.join("proxsmtpd.conf");
        fs::write(&conf_path, format!("Listen: 127.0.0.1:{port}\n{conf}")).unwrap();
        let mut daemon = Daemon::spawn_under(
            wrapper,
            &["-d", "2", "-f", conf_path.to_str().unwrap()],
            &[],
            dir,
        );
        let unshare = daemon.pid;
        let init = wait_for(secs(10), || children(unshare).first().map(|c| c.0))
            .expect("no process 1 under unshare");
        assert!(
            wait_until(secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()
                || daemon.exit_status().is_some()),
            "not listening"
        );
        assert!(daemon.exit_status().is_none(), "exited: {}", daemon.log());
        AsProcessOne { daemon, init, port }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn signal_init(&self, signal: Signal) {
        kill(Pid::from_raw(self.init), signal).expect("signal process 1");
    }
}

fn send_one(addr: SocketAddr, subject: &str) -> u16 {
    let mut c = Client::open(addr);
    let t = c.transaction(
        "<alice@example.org>",
        &["<bob@example.net>"],
        &message(subject, b"Hello.\r\n"),
    );
    c.cmd("QUIT");
    t.final_reply.code
}

#[test]
fn orphans_that_filters_leave_are_reaped() {
    timed(60, || {
        let Some(wrapper) = namespace_wrapper() else {
            return;
        };
        let up = Upstream::start();
        let dir = tempfile::tempdir().unwrap();
        // The subshell exits at once, so its background `sleep` is handed to process 1; the
        // filter's process group is killed when `cat` is done, which leaves the `sleep` a
        // zombie for process 1 to wait for.
        let conf = format!(
            "OutAddress: {}\nFilterCommand: (sleep 30 &) ; cat\nFilterType: pipe\n",
            up.out_address()
        );
        let p = AsProcessOne::start(&wrapper, dir.path(), &conf);
        for i in 0..5 {
            assert_eq!(send_one(p.addr(), &format!("orphan {i}")), 250);
        }
        assert_eq!(up.wait_delivered(5, secs(10)).len(), 5);

        let settled = wait_until(secs(5), || {
            let everyone = descendants(p.init);
            everyone.len() == 1 && everyone[0].1 != 'Z'
        });
        assert!(
            settled,
            "the namespace should hold only process 1 and the proxy, no zombies: {:?}",
            descendants(p.init)
        );
        assert_eq!(children(p.init)[0].2, "proxsmtpd");
    });
}

#[test]
fn signals_reach_the_proxy_and_its_exit_status_comes_back() {
    timed(60, || {
        let Some(wrapper) = namespace_wrapper() else {
            return;
        };
        let up = Upstream::start();
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "OutAddress: {}\nFilterCommand: cat\nReloadWatch: off\n",
            up.out_address()
        );
        let mut p = AsProcessOne::start(&wrapper, dir.path(), &conf);

        p.signal_init(Signal::SIGHUP);
        assert!(
            wait_until(secs(5), || p
                .daemon
                .log()
                .contains("configuration reloaded")),
            "SIGHUP to process 1 did not reload the proxy: {}",
            p.daemon.log()
        );
        assert_eq!(send_one(p.addr(), "after reload"), 250);

        p.signal_init(Signal::SIGTERM);
        let status = p
            .daemon
            .wait_exit(secs(15))
            .expect("did not stop on SIGTERM to process 1");
        assert_eq!(status.code(), Some(0), "{status:?}: {}", p.daemon.log());
        assert!(p.daemon.log().contains("stopped"), "{}", p.daemon.log());
    });
}

#[test]
fn a_config_error_exits_with_the_proxys_status_and_message() {
    timed(60, || {
        let Some(wrapper) = namespace_wrapper() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let conf_path = dir.path().join("broken.conf");
        fs::write(&conf_path, "OutAddress: 127.0.0.1:1\nNoSuchSetting: 1\n").unwrap();
        let conf = conf_path.to_str().unwrap();

        let direct_dir = tempfile::tempdir().unwrap();
        let mut direct = Daemon::spawn(&["-d", "1", "-f", conf], &[], direct_dir.path());
        let want = direct.wait_exit(secs(10)).expect("direct run did not exit");
        assert_ne!(want.code(), Some(0));

        let mut one = Daemon::spawn_under(&wrapper, &["-d", "1", "-f", conf], &[], dir.path());
        let got = one.wait_exit(secs(10)).expect("process 1 did not exit");
        assert_eq!(got.code(), want.code(), "{}", one.log());
        assert!(one.stderr().contains("NoSuchSetting"), "{}", one.stderr());
        assert_eq!(one.stderr(), direct.stderr());
    });
}

#[test]
fn when_the_proxy_dies_its_filter_gets_sigterm_and_the_status_is_128_plus_n() {
    timed(60, || {
        let Some(wrapper) = namespace_wrapper() else {
            return;
        };
        let up = Upstream::start();
        let dir = tempfile::tempdir().unwrap();
        let started = dir.path().join("filter-started");
        let ended = dir.path().join("filter-ended");
        // A filter that runs until it is told to stop, and records that it was. Its stderr
        // is the dead proxy's pipe once the proxy is gone (SIGPIPE on a write): not used.
        let filter = format!(
            "exec 2>/dev/null; trap 'echo ended > {}; exit 0' TERM; echo started > {}; \
             while :; do sleep 0.05; done",
            ended.display(),
            started.display()
        );
        let conf = format!(
            "OutAddress: {}\nFilterCommand: {filter}\nFilterType: pipe\nFilterTimeout: 60\n",
            up.out_address()
        );
        let mut p = AsProcessOne::start(&wrapper, dir.path(), &conf);
        let mut c = Client::open(p.addr());
        c.cmd("MAIL FROM:<alice@example.org>");
        c.cmd("RCPT TO:<bob@example.net>");
        c.cmd("DATA");
        c.send(common::stuff(&message("held", b"Hello.\r\n")));
        assert!(
            wait_until(secs(10), || started.exists()),
            "the filter never started: {}",
            p.daemon.log()
        );

        // The proxy is killed outright: its filter is handed to process 1, which ends it.
        let proxy = children(p.init)[0].0;
        kill(Pid::from_raw(proxy), Signal::SIGKILL).unwrap();
        let status = p
            .daemon
            .wait_exit(secs(15))
            .expect("process 1 did not exit");
        assert_eq!(status.code(), Some(128 + 9), "{}", p.daemon.log());
        assert_eq!(
            fs::read_to_string(&ended).unwrap_or_default().trim(),
            "ended",
            "the filter left behind was not sent SIGTERM before the namespace ended"
        );
        assert!(c.wait_eof(secs(5)), "the client connection stayed open");
    });
}
