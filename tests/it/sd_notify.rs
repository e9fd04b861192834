//! Started by systemd with `Type=notify`: the binary is run, without `-d`, with
//! `NOTIFY_SOCKET` naming a unix datagram socket this test binds, as systemd does. It must
//! stay in the foreground (the process systemd started is the service), send `READY=1` only
//! once the SMTP listener is bound, `WATCHDOG=1` every half `WATCHDOG_USEC`, `RELOADING=1`
//! with `MONOTONIC_USEC` then `READY=1` around a SIGHUP reload, and `STOPPING=1` on SIGTERM.
//! Without `NOTIFY_SOCKET` it forks into the background as the original does.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::proxy::{free_port, pid_alive, pid_listens_on};
use crate::common::{secs, timed, wait_until, Client, Daemon, Upstream};

/// The next notification, or `None` after `timeout`.
fn next(socket: &UnixDatagram, timeout: Duration) -> Option<String> {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Reads notifications until one has the line `want`; the ones before it are returned too.
fn wait_for(socket: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match next(socket, left) {
            Some(msg) => {
                let found = msg.lines().any(|l| l == want);
                seen.push(msg);
                if found {
                    return seen;
                }
            }
            None => break,
        }
    }
    panic!("no {want:?} within {timeout:?}; received {seen:?}");
}

fn config(dir: &std::path::Path, port: u16, up: &Upstream) -> std::path::PathBuf {
    let conf = dir.join("proxsmtpd.conf");
    fs::create_dir_all(dir.join("tmp")).unwrap();
    // The filter records its environment.
    let filter = dir.join("filter.sh");
    fs::write(
        &filter,
        format!(
            "#!/bin/sh\nenv > {}\ncat\n",
            dir.join("filter.env").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&filter, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::write(
        &conf,
        format!(
            "Listen: 127.0.0.1:{port}\nOutAddress: {}\nTempDirectory: {}\nFilterCommand: {}\n\
             ReloadWatch: off\n",
            up.out_address(),
            dir.join("tmp").display(),
            filter.display()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn type_notify_ready_watchdog_reload_stopping() {
    timed(40, || {
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::start();
        let port = free_port();
        let conf = config(dir.path(), port, &up);
        let pid_file = dir.path().join("proxsmtpd.pid");
        let notify_path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&notify_path).unwrap();

        // As the Debian original's unit runs it, but with Type=notify: no -d.
        let mut d = Daemon::spawn(
            &[
                "-f",
                conf.to_str().unwrap(),
                "-p",
                pid_file.to_str().unwrap(),
            ],
            &[
                ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
                ("WATCHDOG_USEC", "400000"),
            ],
            dir.path(),
        );

        let first = next(&socket, secs(15)).expect("no notification at all");
        assert!(
            first.lines().any(|l| l == "READY=1"),
            "the first notification must be READY=1: {first:?}"
        );
        assert!(
            pid_listens_on(d.pid, port),
            "READY=1 before the SMTP listener was bound, or by another process than the one \
             started (it must not fork under systemd)"
        );
        assert!(
            d.exit_status().is_none(),
            "the process systemd started exited"
        );
        assert_eq!(
            fs::read_to_string(&pid_file).unwrap().trim(),
            d.pid.to_string(),
            "the pid file holds the service's own pid"
        );
        // It serves, and the filter does not inherit the protocol's variables: it cannot
        // speak for the daemon.
        let mut c = Client::open(format!("127.0.0.1:{port}").parse().unwrap());
        assert_eq!(c.send_mail(b"Subject: t\r\n\r\nhello\r\n").code, 250);
        c.cmd("QUIT");
        let env = fs::read_to_string(dir.path().join("filter.env")).expect("filter ran");
        for var in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="] {
            assert!(
                !env.lines().any(|l| l.starts_with(var)),
                "the filter sees {var}: {env}"
            );
        }

        // WatchdogSec=0.4 s: a ping at least every 0.2 s.
        let start = Instant::now();
        wait_for(&socket, "WATCHDOG=1", secs(3));
        wait_for(&socket, "WATCHDOG=1", secs(3));
        assert!(start.elapsed() < secs(2), "watchdog pings too slow");

        d.signal(Signal::SIGHUP);
        let seen = wait_for(&socket, "RELOADING=1", secs(5));
        let reloading = seen.last().unwrap();
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"))
            .parse()
            .unwrap();
        assert!(usec > 0);
        wait_for(&socket, "READY=1", secs(5));

        d.signal(Signal::SIGTERM);
        wait_for(&socket, "STOPPING=1", secs(5));
        let status = d.wait_exit(secs(15)).expect("still running after SIGTERM");
        assert!(status.success(), "exit status {status:?}");
        assert!(!pid_file.exists(), "pid file left behind");
    });
}

/// The watchdog belongs to another process (`WATCHDOG_PID`): no pings, still READY=1.
#[test]
fn watchdog_for_another_pid_is_ignored() {
    timed(40, || {
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::start();
        let port = free_port();
        let conf = config(dir.path(), port, &up);
        let notify_path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&notify_path).unwrap();
        let mut d = Daemon::spawn(
            &["-f", conf.to_str().unwrap()],
            &[
                ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
                ("WATCHDOG_USEC", "100000"),
                ("WATCHDOG_PID", "1"),
            ],
            dir.path(),
        );
        wait_for(&socket, "READY=1", secs(15));
        assert_eq!(next(&socket, Duration::from_millis(500)), None);
        d.signal(Signal::SIGTERM);
        wait_for(&socket, "STOPPING=1", secs(5));
        assert!(d.wait_exit(secs(15)).expect("exit").success());
    });
}

/// Not under systemd (the original's `Type=forking` unit, an init script): the started
/// process exits 0 at once and the daemon, another process, writes the pid file and serves.
#[test]
fn without_notify_socket_it_forks_as_before() {
    timed(40, || {
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::start();
        let port = free_port();
        let conf = config(dir.path(), port, &up);
        let pid_file = dir.path().join("proxsmtpd.pid");
        let mut d = Daemon::spawn(
            &[
                "-f",
                conf.to_str().unwrap(),
                "-p",
                pid_file.to_str().unwrap(),
            ],
            &[],
            dir.path(),
        );
        let status = d.wait_exit(secs(15)).expect("the parent did not exit");
        assert!(status.success());
        assert!(wait_until(secs(10), || fs::read_to_string(&pid_file)
            .is_ok_and(|t| t.ends_with('\n'))));
        let daemon: i32 = fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_ne!(daemon, d.pid);
        assert!(wait_until(secs(10), || pid_listens_on(daemon, port)));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), Signal::SIGTERM).unwrap();
        assert!(wait_until(secs(15), || !pid_alive(daemon)));
    });
}
