//! The real binary as process 1 of its own PID namespace, as it runs as a container's entry
//! point: no orphan stays a zombie, signals reach the proxy, process 1 exits with
//! the proxy's status and gives what is left in the namespace a SIGTERM when the proxy is gone.
//!
//! The namespace comes from util-linux `unshare --pid --fork --mount-proc` (with
//! `--map-root-user` when not root); where that is refused the tests are skipped with a note.

use crate::common;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::proxy::free_port;
use crate::common::{
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
    let works = common::command(wrapper[0])
        .args(&wrapper[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        skip!("`{}` is refused here; skipped", wrapper.join(" "));
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

/// The proxy as process 1 of a new namespace, with its upstream and directory, and the host
/// pid of that process 1.
struct AsProcessOne {
    daemon: Daemon,
    init: i32,
    port: u16,
    _up: Upstream,
    dir: tempfile::TempDir,
}

impl AsProcessOne {
    /// Starts `proxsmtpd -d 2 -f CONF` in a new PID namespace, CONF being Listen, OutAddress
    /// and what `settings` gives for the test's directory, and waits until it accepts
    /// connections; None (with a note) where no namespace can be made.
    fn start(settings: impl FnOnce(&Path) -> String) -> Option<AsProcessOne> {
        let wrapper = namespace_wrapper()?;
        let up = Upstream::start();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf_path = dir.path().join("proxsmtpd.conf");
        let conf = format!(
            "Listen: 127.0.0.1:{port}\nOutAddress: {}\n{}",
            up.out_address(),
            settings(dir.path())
        );
        fs::write(&conf_path, conf).unwrap();
        let mut daemon = Daemon::spawn_under(
            &wrapper,
            &["-d", "2", "-f", conf_path.to_str().unwrap()],
            &[],
            dir.path(),
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
        Some(AsProcessOne {
            daemon,
            init,
            port,
            _up: up,
            dir,
        })
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn signal_init(&self, signal: Signal) {
        kill(Pid::from_raw(self.init), signal).expect("signal process 1");
    }

    /// Waits until the namespace holds only process 1 and the live proxy below it.
    fn assert_only_the_proxy_left(&self) {
        let settled = wait_until(secs(5), || {
            let everyone = descendants(self.init);
            everyone.len() == 1 && everyone[0].1 != 'Z'
        });
        assert!(
            settled,
            "the namespace should hold only process 1 and the proxy, no zombies: {:?}",
            descendants(self.init)
        );
        assert_eq!(children(self.init)[0].2, "proxsmtpd");
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
fn no_orphan_stays_a_zombie() {
    timed(60, || {
        // The subshell exits at once, so its background `sleep` is an orphan, taken by the
        // proxy (the subreaper of its filters); the filter's group kill ends it.
        let Some(p) = AsProcessOne::start(|_| {
            "FilterCommand: (sleep 30 &) ; cat\nFilterType: pipe\n".to_string()
        }) else {
            return;
        };
        for i in 0..5 {
            assert_eq!(send_one(p.addr(), &format!("orphan {i}")), 250);
        }
        p.assert_only_the_proxy_left();

        // A process entered into the namespace from outside (as `kubectl exec` does)
        // leaves an orphan that no subreaper takes: it is process 1's to wait for.
        let mark = p.dir.path().join("exec-orphan-done");
        let entered = common::command("nsenter")
            .args(["--target", &p.init.to_string(), "--pid", "--", "sh", "-c"])
            .arg(format!("(sleep 0.2; echo done > {}) &", mark.display()))
            .status()
            .is_ok_and(|s| s.success());
        if !entered {
            skip!("nsenter into the namespace is refused here; that part is skipped");
            return;
        }
        assert!(
            wait_until(secs(5), || mark.exists()),
            "the orphan never ran"
        );
        p.assert_only_the_proxy_left();
    });
}

#[test]
fn signals_reach_the_proxy_and_its_exit_status_comes_back() {
    timed(60, || {
        let Some(mut p) =
            AsProcessOne::start(|_| "FilterCommand: cat\nReloadWatch: off\n".to_string())
        else {
            return;
        };

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
        // A filter that runs until it is told to stop, and records that it was. Its stderr
        // is the dead proxy's pipe once the proxy is gone (SIGPIPE on a write): not used.
        let Some(mut p) = AsProcessOne::start(|dir| {
            format!(
                "FilterCommand: exec 2>/dev/null; trap 'echo ended > {}; exit 0' TERM; \
                 echo started > {}; while :; do sleep 0.05; done\n\
                 FilterType: pipe\nFilterTimeout: 60\n",
                dir.join("filter-ended").display(),
                dir.join("filter-started").display()
            )
        }) else {
            return;
        };
        let started = p.dir.path().join("filter-started");
        let ended = p.dir.path().join("filter-ended");
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
