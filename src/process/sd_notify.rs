//! systemd's service notification protocol (`sd_notify(3)`), for `Type=notify` units.
//!
//! When systemd starts a service whose unit says `Type=notify` it sets `NOTIFY_SOCKET` to
//! the path (or, with a leading `@`, the abstract name) of a unix datagram socket; the
//! service sends newline-separated `VARIABLE=value` assignments to it: `READY=1` once it
//! accepts connections, `RELOADING=1` with `MONOTONIC_USEC=` while it reloads (then
//! `READY=1` again), `STOPPING=1` when it begins to shut down and, when the unit has
//! `WatchdogSec=`, `WATCHDOG=1` at least every `WATCHDOG_USEC` microseconds.
//!
//! Without `NOTIFY_SOCKET` (the original's `Type=forking` units, init scripts, a shell)
//! nothing here does anything and the process forks into the background as it always did.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variables the protocol uses.
pub(crate) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
pub(crate) const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub(crate) const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub(crate) struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
    /// Half of `WATCHDOG_USEC` (as systemd recommends), when the watchdog is on for us.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the values of `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`; `None` when
    /// there is no socket to talk to. `pid` is this process's id, to which a `WATCHDOG_PID`
    /// must be equal for the watchdog to be ours.
    pub(crate) fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> io::Result<Option<Notifier>> {
        let Some(path) = socket.filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let target = socket_address(path)?;
        let watchdog = watchdog_interval(watchdog_usec, watchdog_pid, pid);
        let socket = UnixDatagram::unbound()?;
        Ok(Some(Notifier {
            socket,
            target,
            watchdog,
        }))
    }

    /// From this process's environment.
    pub(crate) fn from_env() -> io::Result<Option<Notifier>> {
        let var = |name| std::env::var(name).ok();
        Notifier::new(
            var(NOTIFY_SOCKET).as_deref(),
            var(WATCHDOG_USEC).as_deref(),
            var(WATCHDOG_PID).as_deref(),
            std::process::id(),
        )
    }

    /// Sends one notification: `VARIABLE=value` lines.
    pub(crate) fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.target)?;
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification truncated",
            ));
        }
        Ok(())
    }

    /// How often `WATCHDOG=1` is due (half the unit's `WatchdogSec=`), if at all.
    pub(crate) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }
}

/// `@name` is an abstract socket, anything else a path.
fn socket_address(value: &str) -> io::Result<SocketAddr> {
    if let Some(name) = value.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(value)
    }
}

/// Half of `WATCHDOG_USEC` when it is a positive number and `WATCHDOG_PID` is unset or
/// this process's id.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        if pid.trim().parse::<u32>().ok() != Some(own) {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

/// `RELOADING=1` with the `CLOCK_MONOTONIC` time in microseconds (which
/// `Type=notify-reload` requires and other types accept).
pub(crate) fn reloading_message(monotonic: Duration) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic.as_micros())
}

/// The `CLOCK_MONOTONIC` time, as systemd reads it.
pub(crate) fn monotonic_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

static GLOBAL: OnceLock<Option<Notifier>> = OnceLock::new();

/// Reads the environment once and removes the protocol's variables from it, so that filter
/// commands (which inherit the environment) cannot speak for the daemon. Call it while the
/// process has a single thread. Returns whether the process runs under a service manager
/// that waits for `READY=1`.
pub(crate) fn init_from_env() -> bool {
    let notifier = GLOBAL.get_or_init(|| match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("proxsmtpd: ignoring {NOTIFY_SOCKET}: {e}");
            None
        }
    });
    for name in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
        std::env::remove_var(name);
    }
    notifier.is_some()
}

/// The notifier [`init_from_env`] found.
pub(crate) fn global() -> Option<&'static Notifier> {
    GLOBAL.get().and_then(Option::as_ref)
}

/// Sends `state` when running under a service manager; failures are logged, never fatal.
pub(crate) fn notify(state: &str) {
    if let Some(n) = global() {
        if let Err(e) = n.notify(state) {
            tracing::warn!("couldn't notify the service manager ({state:?}): {e}");
        }
    }
}

/// Sends `WATCHDOG=1` every half `WatchdogSec=` from the runtime, for as long as it runs:
/// a wedged runtime stops the pings and systemd restarts the service.
pub(crate) fn spawn_watchdog() {
    let Some(interval) = global().and_then(Notifier::watchdog_interval) else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(Some(path.to_str().unwrap()), None, None, 1)
            .unwrap()
            .unwrap();
        n.notify("READY=1\nSTATUS=listening").unwrap();
        assert_eq!(recv(&server), "READY=1\nSTATUS=listening");
        assert_eq!(n.watchdog_interval(), None);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("proxsmtpd-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(Some(&format!("@{name}")), None, None, 1)
            .unwrap()
            .unwrap();
        n.notify("STOPPING=1").unwrap();
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn no_socket_no_notifier() {
        assert!(Notifier::new(None, Some("1000"), None, 1)
            .unwrap()
            .is_none());
        assert!(Notifier::new(Some(""), None, None, 1).unwrap().is_none());
        // Nobody listening: sending fails, creating does not.
        let n = Notifier::new(Some("/nonexistent/notify"), None, None, 1)
            .unwrap()
            .unwrap();
        assert!(n.notify("READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_pid() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(watchdog_interval(Some("1000000"), None, 7), half);
        assert_eq!(watchdog_interval(Some("1000000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval(Some("1000000"), Some(""), 7), half);
        assert_eq!(watchdog_interval(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn reloading_carries_the_monotonic_time() {
        assert_eq!(
            reloading_message(Duration::from_micros(1_234_567)),
            "RELOADING=1\nMONOTONIC_USEC=1234567"
        );
        let a = monotonic_now();
        let b = monotonic_now();
        assert!(a > Duration::ZERO && b >= a);
    }
}
