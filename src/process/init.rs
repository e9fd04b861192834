//! Running as process 1, the first process of a container's PID namespace.
//!
//! The image starts proxsmtpd as the container's entry point, so it is process 1 there, and
//! process 1 inherits every orphan of the namespace that no subreaper takes. The proxy is
//! the subreaper of its filters' descendants (`filter::orphans`), but a `kubectl exec`
//! shell's background jobs, or the filters still running when the proxy itself dies, are
//! handed to process 1, and a process 1 that never waits for them leaves a zombie each time,
//! until the pod runs out of process ids.
//!
//! So process 1 stays a small init: it starts the proxy again as its only child (same
//! binary, same arguments), forwards the signals an operator or the kubelet sends, reaps
//! every child that ends, and exits with the proxy's status. When the proxy has stopped,
//! whatever is left in the namespace (a filter descendant that left its process group) is
//! ended too, so that the container stops.
//!
//! Nothing here is used when proxsmtpd is not process 1.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Signals passed on to the proxy: stop (TERM, INT, QUIT), reload (HUP) and the user ones.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// How long what is left after the proxy stopped gets to end on SIGTERM before SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

/// True when this process is the first of its PID namespace.
pub fn is_process_one() -> bool {
    std::process::id() == 1
}

/// Runs the proxy as a child and supervises it; returns the exit code for process 1.
pub fn supervise() -> ExitCode {
    let mut watched = SigSet::empty();
    for signal in FORWARDED {
        watched.add(signal);
    }
    watched.add(Signal::SIGCHLD);
    // Blocked before the child exists, so no signal and no child's end can slip by before
    // the loop waits for them. The child inherits the mask and clears it first thing
    // (`app::clear_inherited_signal_mask`).
    if let Err(e) = watched.thread_block() {
        eprintln!("proxsmtpd: init: couldn't block signals: {e}");
        return ExitCode::from(1);
    }
    let proxy = match std::env::current_exe()
        .and_then(|exe| Command::new(exe).args(std::env::args_os().skip(1)).spawn())
    {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            eprintln!("proxsmtpd: init: couldn't start the proxy: {e}");
            return ExitCode::from(1);
        }
    };

    let mut proxy_status = None;
    while proxy_status.is_none() {
        match watched.wait() {
            Ok(Signal::SIGCHLD) => proxy_status = reap(Some(proxy)),
            Ok(signal) => {
                let _ = kill(proxy, signal);
            }
            Err(e) => {
                eprintln!("proxsmtpd: init: waiting for signals: {e}");
                break;
            }
        }
    }
    end_leftovers();
    ExitCode::from(proxy_status.map_or(1, exit_code))
}

/// Waits for every child that has ended; returns the proxy's status if it was among them.
fn reap(proxy: Option<Pid>) -> Option<WaitStatus> {
    let mut proxy_status = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return proxy_status,
            Ok(status) if status.pid() == proxy => proxy_status = Some(status),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("proxsmtpd: init: waitpid: {e}");
                return proxy_status;
            }
        }
    }
}

/// Ends every other process of the namespace: SIGTERM, a grace period, then SIGKILL.
fn end_leftovers() {
    // kill(-1) from process 1 reaches every other process of the namespace that it may
    // signal; ESRCH (nothing left) is the usual case.
    let everyone = Pid::from_raw(-1);
    for (signal, grace) in [
        (Signal::SIGTERM, LEFTOVER_GRACE),
        (Signal::SIGKILL, LEFTOVER_GRACE),
    ] {
        if kill(everyone, signal).is_err() {
            return;
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            reap(None);
            if kill(everyone, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The exit code a shell would give: the proxy's own, or 128 + the signal that ended it.
fn exit_code(status: WaitStatus) -> u8 {
    match status {
        WaitStatus::Exited(_, code) => code.clamp(0, 255) as u8,
        WaitStatus::Signaled(_, signal, _) => 128u8.saturating_add(signal as u8),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_is_the_proxys_or_128_plus_the_signal() {
        let pid = Pid::from_raw(7);
        let cases = [
            (WaitStatus::Exited(pid, 0), 0),
            (WaitStatus::Exited(pid, 1), 1),
            (WaitStatus::Exited(pid, 78), 78),
            (WaitStatus::Signaled(pid, Signal::SIGKILL, false), 137),
            (WaitStatus::Signaled(pid, Signal::SIGTERM, true), 143),
            (WaitStatus::Stopped(pid, Signal::SIGSTOP), 1),
        ];
        for (status, want) in cases {
            assert_eq!(exit_code(status), want, "{status:?}");
        }
    }
}
