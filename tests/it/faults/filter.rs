//! Fault matrix, filter side: the filter hangs, leaves children behind, crashes, floods
//! stderr, ignores its input, destroys its file, or cannot be run at all. Every case ends
//! with [`fault_support::Watch::check`]: no 2xx for a message the upstream did not accept
//! (except an explicit silent drop), no temp file, process or descriptor left, and a new
//! session still delivers.
//!
//! The filter scripts misbehave only for fault messages (sender `fault...@`), so the
//! warm-up and follow-up messages go through the same filter normally.

use std::time::{Duration, Instant};

use crate::common::{secs, timed, Proxy, ProxyBuilder, Upstream};
use crate::fault_support::{
    reconfigure, rss_kib, stubborn_transaction, switch_filter, upstream_accepted, Attempt, Watch,
};

const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

struct Setup {
    up: Upstream,
    p: Proxy,
    watch: Watch,
}

/// A proxy whose filter runs `fault` for fault messages; `file_mode` selects FilterType.
fn setup(fault: &str, file_mode: bool, settings: &[(&str, &str)]) -> Setup {
    let up = Upstream::start();
    let b = ProxyBuilder::new().upstream(&up);
    let script = b.script("filter.sh", &switch_filter(fault, file_mode));
    let mut b = b
        .set("FilterCommand", &script)
        .set("FilterType", if file_mode { "file" } else { "pipe" });
    for (k, v) in settings {
        b = b.set(k, v);
    }
    let tmp = b.tmp_dir();
    let p = b.start();
    let watch = Watch::start(&p, &up, &tmp);
    Setup { up, p, watch }
}

impl Setup {
    fn attempt(&mut self, what: &str) -> Attempt {
        let id = self.watch.id(&format!("fault-{what}"));
        stubborn_transaction(self.p.addr(), &id, REPLY_TIMEOUT)
    }

    fn check(&self, attempts: &[Attempt], drops: &[&str]) {
        self.watch.check(&self.p, &self.up, attempts, drops);
    }
}

fn final_text(a: &Attempt) -> String {
    a.final_reply
        .as_ref()
        .map(|r| r.raw_str())
        .unwrap_or_else(|| format!("no final reply ({:?})", a.ended))
}

fn assert_final(a: &Attempt, want: &str) {
    assert!(
        final_text(a).starts_with(want),
        "final reply {:?}, expected {want:?}; replies {:?}",
        final_text(a),
        a.replies
    );
}

#[test]
fn filter_hangs_and_ignores_sigterm() {
    timed(60, || {
        let mut s = setup(
            "trap '' TERM\nsleep 60 &\nsleep 60",
            false,
            &[("FilterTimeout", "1")],
        );
        let started = Instant::now();
        let a = s.attempt("hang");
        assert_final(&a, "451");
        assert!(started.elapsed() < secs(10), "took {:?}", started.elapsed());
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_hangs_in_file_mode() {
    timed(60, || {
        let mut s = setup(
            "trap '' TERM\nsleep 60 &\nsleep 60",
            true,
            &[("FilterTimeout", "1")],
        );
        let a = s.attempt("hang");
        assert_final(&a, "451");
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_grandchild_holds_stdout_and_stderr() {
    timed(60, || {
        // The grandchild keeps the filter's stdout and stderr open and outlives it; the
        // message is still answered at once, and the grandchild is killed with the group.
        let mut s = setup("(sleep 60 &)\n( (sleep 60 &) & )", false, &[]);
        let started = Instant::now();
        let a = s.attempt("grandchild");
        assert_final(&a, "250");
        assert!(started.elapsed() < secs(5), "took {:?}", started.elapsed());
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_grandchild_rejects_while_holding_stderr() {
    timed(60, || {
        let mut s = setup(
            "sleep 60 &\necho '554 5.7.1 bad content' >&2\nexit 1",
            false,
            &[],
        );
        let a = s.attempt("grandchild");
        assert_final(&a, "554 5.7.1 bad content");
        s.check(&[a], &[]);
    });
}

/// It has left the filter's process group, so the group kill misses it; the daemon is its
/// subreaper and kills it (`filter::orphans`).
#[test]
fn filter_grandchild_in_a_new_session_is_not_left_behind() {
    timed(60, || {
        let mut s = setup("setsid sleep 60 &", false, &[]);
        let a = s.attempt("setsid");
        assert_final(&a, "250");
        s.check(&[a], &[]);
    });
}

/// An orphan still in the group of the filter that is running is part of that filter's work:
/// it is left to finish (the group kill at the filter's end is what ends such processes).
#[test]
fn orphan_in_a_running_filters_group_is_left_to_finish() {
    timed(60, || {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("late-work-done");
        // Each inner shell exits at once, so its background job is an orphan, handed to the
        // daemon, while the filter itself still runs for two seconds. The short one ends first
        // and its SIGCHLD makes the daemon look at its children while the long one runs.
        let fault = format!(
            "sh -c '(sleep 0.6; echo done > {}) &'\nsh -c 'sleep 0.2 &'\nsleep 2",
            mark.display()
        );
        let mut s = setup(&fault, false, &[]);
        let a = s.attempt("group-orphan");
        assert_final(&a, "250");
        assert_eq!(
            std::fs::read_to_string(&mark).unwrap_or_default().trim(),
            "done",
            "the orphan in the running filter's group was killed early"
        );
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_crashes() {
    timed(60, || {
        for (what, code) in [("segv", "kill -SEGV $$"), ("kill9", "kill -9 $$")] {
            for file_mode in [false, true] {
                let mut s = setup(code, file_mode, &[]);
                let a = s.attempt(what);
                assert_final(&a, "451");
                s.check(&[a], &[]);
            }
        }
    });
}

#[test]
fn filter_program_crashing_inside_a_script_never_bounces() {
    timed(60, || {
        // `sh -c 'kill -SEGV $$'` run as a command of the script: the script's shell
        // reports the crash and exits 139.
        let mut s = setup("sh -c 'kill -SEGV $$'\nexit $?", false, &[]);
        let a = s.attempt("inner-segv");
        assert_final(&a, "4");
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_writes_100_mb_to_stderr() {
    timed(90, || {
        let flood = "head -c 100000000 /dev/zero | tr '\\0' x >&2";
        let mut s = setup(
            &format!("{flood}\nprintf '\\n554 5.7.1 noisy\\n' >&2\nexit 1"),
            false,
            &[],
        );
        let before = rss_kib(s.p.pid());
        let a = s.attempt("stderr-flood");
        assert_final(&a, "554 5.7.1 noisy");
        let after = rss_kib(s.p.pid());
        assert!(
            after < before + 64 * 1024,
            "the proxy's RSS grew from {before} KiB to {after} KiB"
        );
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_writes_100_mb_to_stderr_and_accepts() {
    timed(90, || {
        let mut s = setup("head -c 100000000 /dev/zero | tr '\\0' x >&2", false, &[]);
        let a = s.attempt("stderr-flood");
        assert_final(&a, "250");
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_exits_without_reading_stdin() {
    timed(60, || {
        let mut s = setup("echo '550 5.7.1 not even read' >&2\nexit 1", false, &[]);
        let a = s.attempt("noread-reject");
        assert_final(&a, "550 5.7.1 not even read");
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_exits_0_without_reading_stdin() {
    timed(60, || {
        // As in 1.10, the filter's (empty) output is what gets delivered: the client's 250
        // is backed by the upstream's acceptance of that empty message.
        let mut s = setup("exit 0", false, &[]);
        let a = s.attempt("noread-accept");
        assert_final(&a, "250");
        assert!(
            s.up.delivered().iter().any(|m| m.content.is_empty()),
            "the empty output was not delivered: {:#?}",
            s.up.summary()
        );
        s.check(&[], &[]);
    });
}

#[test]
fn filter_silent_drop_is_the_only_unbacked_2xx() {
    timed(60, || {
        let mut s = setup("echo '250 2.0.0 dropped' >&2\nexit 1", false, &[]);
        let a = s.attempt("drop");
        assert_final(&a, "250 2.0.0 dropped");
        assert!(
            !upstream_accepted(&s.up, &a.id),
            "a dropped message was delivered"
        );
        let id = a.id.clone();
        s.check(&[a], &[&id]);
    });
}

#[test]
fn filter_deletes_email_in_file_mode() {
    timed(60, || {
        let mut s = setup("rm -f \"$EMAIL\"", true, &[]);
        let a = s.attempt("deleted");
        assert_final(&a, "451");
        s.check(&[a], &[]);
    });
}

#[test]
fn filter_truncates_email_in_file_mode() {
    timed(60, || {
        let mut s = setup(": > \"$EMAIL\"", true, &[]);
        let a = s.attempt("truncated");
        // The filter's word: an empty message is what it wants delivered.
        assert_final(&a, "250");
        assert!(
            s.up.delivered().iter().any(|m| m.content.is_empty()),
            "{:#?}",
            s.up.summary()
        );
        s.check(&[], &[]);
    });
}

#[test]
fn filter_replaces_email_in_file_mode() {
    timed(60, || {
        // Rewriting by replacement (a new file renamed over $EMAIL) is allowed.
        let mut s = setup(
            "sed 's/^id=/id=/' \"$EMAIL\" > \"$EMAIL.new\" && mv \"$EMAIL.new\" \"$EMAIL\"",
            true,
            &[],
        );
        let a = s.attempt("replaced");
        assert_final(&a, "250");
        s.check(&[a], &[]);
    });
}

/// Switches FilterCommand to `broken` for one fault message, then back.
fn broken_command(broken: &str, want: &str) {
    let mut s = setup("", false, &[]);
    let good = fs_read_setting(&s.p, "FilterCommand");
    reconfigure(&s.p, "FilterCommand", broken);
    let a = s.attempt("broken");
    assert_final(&a, want);
    reconfigure(&s.p, "FilterCommand", &good);
    s.check(&[a], &[]);
}

fn fs_read_setting(p: &Proxy, name: &str) -> String {
    let text = std::fs::read_to_string(&p.conf_path).expect("config");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name} not set"))
        .to_string()
}

#[test]
fn filter_is_not_executable() {
    timed(60, || {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("noexec.sh");
        std::fs::write(&path, "#!/bin/sh\nexec cat\n").expect("write");
        let path = path.display().to_string();
        // Run directly, and through the shell: a configuration error tempfails.
        broken_command(&path, "451");
        broken_command(&format!("exec {path}"), "451");
    });
}

#[test]
fn filter_does_not_exist() {
    timed(60, || {
        broken_command("/nonexistent/proxsmtpd-filter", "451");
        broken_command("exec /nonexistent/proxsmtpd-filter --flag", "451");
        broken_command("no-such-filter-command-proxsmtpd", "451");
    });
}
