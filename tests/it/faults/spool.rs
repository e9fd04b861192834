//! Fault matrix, spool side: TempDirectory missing, unwritable, full, or over a file-size
//! limit, while a message arrives. With a filter the client must get a temporary failure
//! after its whole body (never a 2xx, never body lines taken as commands); without one the
//! body is not spooled and the message goes through. Nothing may be left behind, and the
//! proxy must serve normally once the directory is back.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{timed, Proxy, ProxyBuilder, Upstream};
use crate::fault_support::{tagged_message, Attempt, Watch};

const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A message of about `size` bytes carrying `id`, sent in one session; returns what the
/// client saw. Body lines look like commands, to catch a desynchronised proxy.
fn big_attempt(p: &Proxy, id: &str, size: usize) -> Attempt {
    let mut a = Attempt::new(id);
    let mut c = common::Client::open(p.addr());
    c.set_timeout(REPLY_TIMEOUT);
    for line in [
        format!("MAIL FROM:<{id}@faults.test>"),
        "RCPT TO:<bob@faults.test>".to_string(),
        "DATA".to_string(),
    ] {
        if a.cmd(&mut c, &line).is_none() {
            return a;
        }
    }
    let filler = b"RCPT TO:<injected@faults.test>\r\n".repeat(size / 32 + 1);
    c.send(common::stuff(&tagged_message(id, &filler)));
    a.final_reply = a.read(&mut c);
    // In step: the next command gets its own answer (checked by `assert_tempfail`).
    if a.final_reply.is_some() {
        a.cmd(&mut c, "NOOP");
    }
    a
}

/// A 4xx after the body, and the session still in step (the NOOP after it got 250).
fn assert_tempfail(a: &Attempt) {
    let code = a.final_code();
    assert!(
        code.is_some_and(|c| (400..500).contains(&c)),
        "expected a 4xx after the body, got {:?} ({:?})",
        a.final_reply,
        a.replies
    );
    assert!(
        a.replies.last().is_some_and(|r| r.starts_with("250")),
        "out of step after the failed message: {a:?}"
    );
}

/// Without a filter the body is streamed upstream and never spooled, so a spool fault does
/// not touch it: the message is delivered. With a filter it is a temporary failure.
fn assert_spool_outcome(filter: Option<&str>, a: &Attempt) {
    if filter.is_some() {
        assert_tempfail(a);
    } else {
        assert!(a.acknowledged(), "no filter, no spool: {a:?}");
    }
}

fn assert_not_injected(up: &Upstream) {
    let lines: Vec<String> = up.sessions().iter().flat_map(|s| s.lines()).collect();
    assert!(
        !lines.iter().any(|l| l.contains("injected@")),
        "body lines reached the upstream as commands: {lines:?}"
    );
}

/// Starts a proxy with `filter` (pipe mode; None = no filter) whose TempDirectory is
/// `spool` (default: the builder's tmp dir).
fn start(
    up: &Upstream,
    filter: Option<&str>,
    spool: Option<&Path>,
    f: impl FnOnce(ProxyBuilder) -> ProxyBuilder,
) -> (Proxy, PathBuf) {
    let mut b = ProxyBuilder::new().upstream(up);
    if let Some(cmd) = filter {
        b = b.set("FilterCommand", cmd);
    }
    let spool = spool.map(Path::to_path_buf).unwrap_or_else(|| b.tmp_dir());
    b = b.set("TempDirectory", &spool.display().to_string());
    let b = f(b);
    (b.start(), spool)
}

#[test]
fn spool_directory_missing() {
    timed(60, || {
        for filter in [Some("cat"), None] {
            let up = Upstream::start();
            let (p, spool) = start(&up, filter, None, |b| b);
            let mut watch = Watch::start(&p, &up, &spool);
            let aside = spool.with_extension("aside");
            fs::rename(&spool, &aside).expect("move TempDirectory away");
            let a = big_attempt(&p, &watch.id("fault-missing"), 100_000);
            assert_spool_outcome(filter, &a);
            fs::rename(&aside, &spool).expect("put TempDirectory back");
            assert_not_injected(&up);
            watch.check(&p, &up, &[a], &[]);
        }
    });
}

#[test]
fn spool_directory_missing_in_file_mode() {
    timed(60, || {
        let up = Upstream::start();
        let (p, spool) = start(&up, Some("true"), None, |b| b.set("FilterType", "file"));
        let mut watch = Watch::start(&p, &up, &spool);
        let aside = spool.with_extension("aside");
        fs::rename(&spool, &aside).expect("move TempDirectory away");
        let a = big_attempt(&p, &watch.id("fault-missing"), 100_000);
        assert_tempfail(&a);
        fs::rename(&aside, &spool).expect("put TempDirectory back");
        assert_not_injected(&up);
        watch.check(&p, &up, &[a], &[]);
    });
}

#[test]
fn spool_directory_unwritable() {
    timed(60, || {
        let up = Upstream::start();
        let root = is_root();
        let (p, spool) = start(&up, Some("cat"), None, |b| {
            if !root {
                return b;
            }
            // Root ignores permissions: the proxy runs as nobody, which owns the spool.
            fs::set_permissions(b.dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
            let nobody = nix::unistd::User::from_name("nobody")
                .ok()
                .flatten()
                .expect("user nobody");
            nix::unistd::chown(&b.tmp_dir(), Some(nobody.uid), Some(nobody.gid))
                .expect("chown spool");
            b.set("User", "nobody")
        });
        let mut watch = Watch::start(&p, &up, &spool);
        fs::set_permissions(&spool, fs::Permissions::from_mode(0o500)).expect("chmod 0500");
        let a = big_attempt(&p, &watch.id("fault-unwritable"), 100_000);
        fs::set_permissions(&spool, fs::Permissions::from_mode(0o700)).expect("chmod 0700");
        assert_tempfail(&a);
        assert_not_injected(&up);
        watch.check(&p, &up, &[a], &[]);
    });
}

/// A tmpfs of `size` mounted for the test; unmounted on drop.
struct SmallFs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    /// `None` (with a note) when not root or when mounting is not allowed here.
    fn mount(size: &str) -> Option<SmallFs> {
        if !is_root() {
            skip!("not root: the full-disk case needs a tmpfs mount; skipped");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("proxsmtpd-full.")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("spool");
        fs::create_dir(&path).expect("mount point");
        let ok = common::command("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip!("mounting a tmpfs failed here; the full-disk case is skipped");
            return None;
        }
        Some(SmallFs { path, _dir: dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = common::command("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn spool_full_while_receiving() {
    timed(60, || {
        let Some(fs64) = SmallFs::mount("64k") else {
            return;
        };
        for filter in [Some("cat"), None] {
            let up = Upstream::start();
            let (p, spool) = start(&up, filter, Some(&fs64.path), |b| b);
            let mut watch = Watch::start(&p, &up, &spool);
            // The body alone does not fit.
            let a = big_attempt(&p, &watch.id("fault-full"), 200_000);
            assert_spool_outcome(filter, &a);
            assert_not_injected(&up);
            watch.check(&p, &up, &[a], &[]);
        }
    });
}

#[test]
fn spool_full_for_the_filter_output() {
    timed(60, || {
        let Some(fs64) = SmallFs::mount("64k") else {
            return;
        };
        let up = Upstream::start();
        let (p, spool) = start(&up, Some("cat"), Some(&fs64.path), |b| b);
        let mut watch = Watch::start(&p, &up, &spool);
        // The spooled body fits, the filter's copy of it does not: `cat` fails and exits
        // 1, which is a reject by the filter contract. Nothing is delivered either way.
        let a = big_attempt(&p, &watch.id("fault-full-output"), 40_000);
        assert!(!a.acknowledged(), "acknowledged: {a:?}");
        assert!(
            a.final_reply
                .as_ref()
                .is_some_and(|r| r.raw_str().contains("No space left")),
            "{a:?}"
        );
        watch.check(&p, &up, &[a], &[]);
    });
}

#[test]
fn spool_over_the_file_size_limit() {
    timed(60, || {
        if !std::path::Path::new("/usr/bin/prlimit").exists() {
            skip!("prlimit is not installed; skipped");
            return;
        }
        let up = Upstream::start();
        let (mut p, spool) = start(&up, Some("cat"), None, |b| {
            b.wrapper(&["/usr/bin/prlimit", "--fsize=65536", "--"])
        });
        let mut watch = Watch::start(&p, &up, &spool);
        let a = big_attempt(&p, &watch.id("fault-fsize"), 200_000);
        if !p.alive() {
            panic!("the proxy died: {:?}", p.terminate(Duration::from_secs(1)));
        }
        assert_tempfail(&a);
        assert_not_injected(&up);
        watch.check(&p, &up, &[a], &[]);
    });
}
