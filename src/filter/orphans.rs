//! What a filter leaves outside its process group.
//!
//! Every filter runs in a process group of its own, and the group is killed when the filter
//! is done, so a background job of a filter script does not outlive the message. A
//! descendant that calls `setsid()` has left that group. To reach it the daemon is a child
//! subreaper (`PR_SET_CHILD_SUBREAPER`): once the process that started it is gone, such an
//! orphan becomes a child of the daemon instead of going to process 1. On each SIGCHLD the
//! daemon then looks at its children that are not filters it started itself: ended ones are
//! waited for (no zombies), and live ones that are not in the group of a running filter are
//! killed. A process still in a running filter's group is left alone; the group kill at the
//! filter's end takes care of it, and a sweep follows that kill for whatever left the group
//! just before it.
//!
//! The filters themselves are tokio's to wait for. Their pids are registered here from the
//! spawn (a sweep waits for spawns under way) until the filter has been waited for, so a
//! sweep never takes a filter's exit status away from tokio.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Pids of the filters started and not yet waited for (each is also its group's id).
fn filters() -> MutexGuard<'static, HashSet<i32>> {
    static FILTERS: OnceLock<Mutex<HashSet<i32>>> = OnceLock::new();
    FILTERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Held shared while a filter is being started and registered, exclusively by a sweep: a
/// sweep never sees a filter that is started but not yet registered, and filters still
/// start side by side.
fn spawn_gate() -> &'static RwLock<()> {
    static GATE: RwLock<()> = RwLock::new(());
    &GATE
}

/// Runs `spawn` and registers the filter it starts (`pid` says which pid that is) until the
/// returned registration is dropped.
pub(crate) fn spawn_registered<T, E>(
    spawn: impl FnOnce() -> Result<T, E>,
    pid: impl Fn(&T) -> Option<u32>,
) -> Result<(T, Registration), E> {
    let _starting = spawn_gate().read().unwrap_or_else(|e| e.into_inner());
    let child = spawn()?;
    let id = pid(&child).and_then(|p| i32::try_from(p).ok());
    if let Some(id) = id {
        filters().insert(id);
    }
    Ok((child, Registration(id)))
}

/// A registered filter. Dropped once the filter has been waited for, or is left to tokio to
/// wait for, and its group has been killed: a descendant that left the group just before
/// that kill is now an orphan of this process that no SIGCHLD announces, so a sweep is
/// asked for.
pub(crate) struct Registration(Option<i32>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            filters().remove(&pid);
            sweep_wanted().notify_one();
        }
    }
}

fn sweep_wanted() -> &'static Notify {
    static WANTED: OnceLock<Notify> = OnceLock::new();
    WANTED.get_or_init(Notify::new)
}

/// Makes this process the subreaper of what its filters leave and watches for those orphans.
/// Needs a tokio runtime; call once, after daemonising.
pub(crate) fn start_reaping() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn!("couldn't become a child subreaper ({e}): what a filter runs outside its process group can outlive it");
        return;
    }
    let mut children_ended = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            warn!("couldn't watch SIGCHLD ({e}): orphans of filters are not reaped");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ended = children_ended.recv() => if ended.is_none() { break },
                () = sweep_wanted().notified() => {}
            }
            sweep();
            // Filters end by the hundred per second under load: one sweep covers every
            // SIGCHLD and request that arrives meanwhile, at most ten sweeps a second.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// One pass over the children that are not registered filters.
fn sweep() {
    let _no_start_under_way = spawn_gate().write().unwrap_or_else(|e| e.into_inner());
    let filters = filters();
    for child in own_children(&filters) {
        let pid = Pid::from_raw(child.pid);
        if child.state == 'Z' {
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        } else if !filters.contains(&child.group) {
            warn!(
                pid = child.pid,
                "killing a process a filter left running outside its process group"
            );
            let _ = kill(pid, Signal::SIGKILL);
        } else {
            debug!(
                pid = child.pid,
                group = child.group,
                "orphan in a running filter's group"
            );
        }
    }
}

#[derive(Debug, PartialEq)]
struct ChildProcess {
    pid: i32,
    state: char,
    group: i32,
}

/// The children of this process, from /proc, less the pids in `skip`.
fn own_children(skip: &HashSet<i32>) -> Vec<ChildProcess> {
    let me = std::process::id();
    let mut pids = Vec::new();
    // An orphan is handed to one of the process's threads; each lists its own children.
    match std::fs::read_dir("/proc/self/task") {
        Ok(tasks) => {
            for task in tasks.flatten() {
                let list = std::fs::read_to_string(task.path().join("children"));
                pids.extend(
                    list.unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
        Err(e) => debug!("couldn't list threads: {e}"),
    }
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter(|pid| !skip.contains(pid))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let child = parse_stat(&stat)?;
            (child.0 == me as i32).then_some(ChildProcess {
                pid,
                state: child.1,
                group: child.2,
            })
        })
        .collect()
}

/// (parent, state, process group) from a `/proc/PID/stat` line.
fn parse_stat(stat: &str) -> Option<(i32, char, i32)> {
    // "pid (comm) state ppid pgrp ...": the name may hold spaces and parentheses.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let parent = rest.next()?.parse().ok()?;
    let group = rest.next()?.parse().ok()?;
    Some((parent, state, group))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn stat_lines() {
        let cases = [
            ("42 (sleep) S 7 42 42 0 -1 4194560", Some((7, 'S', 42))),
            ("43 (a) b) (c) Z 1 40 40 0", Some((1, 'Z', 40))),
            ("44 (sh) R", None),
            ("garbage", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_stat(line), want, "{line}");
        }
    }

    #[test]
    fn own_children_lists_a_child_with_its_group() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let found = own_children(&HashSet::new())
            .into_iter()
            .find(|c| c.pid == pid);
        let skipped = own_children(&HashSet::from([pid]));
        let _ = child.kill();
        let _ = child.wait();
        let found = found.expect("the child is listed");
        assert!(skipped.iter().all(|c| c.pid != pid));
        assert_eq!(found.group, pid);
        assert_ne!(found.state, 'Z');
    }
}
