//! A slow TempDirectory must not slow down anyone else: spool writes and reads run off the
//! proxy's async worker threads. The spool lies on a FUSE file system whose every read and
//! write call sleeps in the kernel (a real stalled `read(2)`/`write(2)`, not a mock), the
//! proxy has a single worker thread, and while one message crawls through that spool other
//! sessions must get their greeting and their answers to EHLO, MAIL, RCPT, RSET and QUIT as
//! quickly as ever. The slow message itself must still arrive byte for byte.

use crate::common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{message, secs, timed, Client, ProxyBuilder, Upstream};

/// How long each read or write call on the slow file system sleeps.
const CALL_DELAY: Duration = Duration::from_millis(1000);
/// The longest any reply of a session that does not touch the spool may take. On blocking
/// code a stalled spool call holds the only worker thread for a whole `CALL_DELAY`.
const REPLY_BOUND: Duration = Duration::from_millis(500);
/// Body size of the slow message: a few 64 KiB spool writes and reads.
const BODY_SIZE: usize = 192 * 1024;

const PYTHON: &str = "/usr/bin/python3";

/// A pass-through FUSE file system over a backing directory whose read and write calls
/// sleep. `direct_io` makes every read(2)/write(2) reach it (no page cache in between).
const SLOWFS: &str = r#"
import errno, os, sys, time
try:
    import fusepy as fuse
except ImportError:
    import fuse

class Slow(fuse.Operations):
    def __init__(self, root, delay):
        self.root = root
        self.delay = delay

    def _p(self, path):
        return os.path.join(self.root, path.lstrip('/'))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._p(path))
        except OSError as e:
            raise fuse.FuseOSError(e.errno)
        keys = ('st_atime', 'st_ctime', 'st_gid', 'st_mode', 'st_mtime', 'st_nlink',
                'st_size', 'st_uid')
        return {k: getattr(st, k) for k in keys}

    def access(self, path, mode):
        if not os.access(self._p(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def readdir(self, path, fh):
        return ['.', '..'] + os.listdir(self._p(path))

    def statfs(self, path):
        st = os.statvfs(self._p(path))
        keys = ('f_bavail', 'f_bfree', 'f_blocks', 'f_bsize', 'f_favail', 'f_ffree',
                'f_files', 'f_flag', 'f_frsize', 'f_namemax')
        return {k: getattr(st, k) for k in keys}

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)

    def rmdir(self, path):
        os.rmdir(self._p(path))

    def unlink(self, path):
        os.unlink(self._p(path))

    def rename(self, old, new):
        os.rename(self._p(old), self._p(new))

    def utimens(self, path, times=None):
        os.utime(self._p(path), times)

    def truncate(self, path, length, fh=None):
        os.truncate(self._p(path), length)

    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def read(self, path, size, offset, fh):
        time.sleep(self.delay)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        time.sleep(self.delay)
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

backing, mountpoint, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
fuse.FUSE(Slow(backing, delay), mountpoint, foreground=True, direct_io=True,
          big_writes=True, allow_other=True, default_permissions=True)
"#;

/// The slow file system, mounted for the test; unmounted on drop.
struct SlowFs {
    mountpoint: PathBuf,
    daemon: Child,
    _dir: tempfile::TempDir,
}

impl SlowFs {
    /// `None` (after `skip!`) when a prerequisite is missing.
    fn mount(delay: Duration) -> Option<SlowFs> {
        if !nix::unistd::geteuid().is_root() {
            skip!("not root: the slow spool needs a FUSE mount; skipped");
            return None;
        }
        if !Path::new("/dev/fuse").exists() {
            skip!("no /dev/fuse: the slow spool needs FUSE; skipped");
            return None;
        }
        let has_fusepy = common::command(PYTHON)
            .args(["-c", "import fusepy"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_fusepy {
            skip!("{PYTHON} without fusepy (Debian: python3-fusepy); skipped");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("proxsmtpd-slowfs.")
            .tempdir()
            .expect("tempdir");
        let backing = dir.path().join("backing");
        let mountpoint = dir.path().join("spool");
        fs::create_dir(&backing).expect("backing dir");
        fs::create_dir(&mountpoint).expect("mount point");
        let script = dir.path().join("slowfs.py");
        fs::write(&script, SLOWFS).expect("write slowfs.py");
        let daemon = common::command(PYTHON)
            .arg(&script)
            .arg(&backing)
            .arg(&mountpoint)
            .arg(delay.as_secs_f64().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("slowfs.log")).expect("log"))
            .process_group(0)
            .spawn()
            .expect("start slowfs.py");
        common::register_process_group(daemon.id() as i32);
        let mut fs = SlowFs {
            mountpoint,
            daemon,
            _dir: dir,
        };
        let mounted = common::wait_until(secs(10), || fs.mounted() || fs.exited());
        if !mounted || fs.exited() {
            let log = fs::read_to_string(fs._dir.path().join("slowfs.log")).unwrap_or_default();
            skip!("mounting the slow FUSE file system failed here: {log}");
            return None;
        }
        Some(fs)
    }

    fn mounted(&self) -> bool {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let want = self.mountpoint.display().to_string();
        mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
    }

    fn exited(&mut self) -> bool {
        !matches!(self.daemon.try_wait(), Ok(None))
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        let _ = common::command("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status();
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// One session that never reaches DATA; returns the slowest reply's time and which it was.
fn probe(addr: std::net::SocketAddr, i: usize) -> (Duration, String) {
    let mut worst = (Duration::ZERO, String::new());
    let mut note = |what: &str, started: Instant| {
        let took = started.elapsed();
        if took > worst.0 {
            worst = (took, what.to_string());
        }
    };
    let started = Instant::now();
    let mut c = Client::connect(addr);
    // Long enough to measure how late a reply is rather than give up on it.
    c.set_timeout(secs(60));
    let g = c.greeting();
    note("greeting", started);
    assert_eq!(g.code, 220, "greeting: {g:?}");
    for (line, code) in [
        ("EHLO probe.example".to_string(), 250),
        (format!("MAIL FROM:<probe{i}@example.org>"), 250),
        ("RCPT TO:<rcpt@example.org>".to_string(), 250),
        ("RSET".to_string(), 250),
        ("QUIT".to_string(), 221),
    ] {
        let started = Instant::now();
        let r = c.cmd(&line);
        note(&line, started);
        assert_eq!(r.code, code, "{line}: {r:?}");
    }
    worst
}

#[test]
fn a_slow_spool_does_not_delay_other_sessions() {
    timed(120, || {
        let Some(slow) = SlowFs::mount(CALL_DELAY) else {
            return;
        };
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            // File mode with a filter that does nothing: the spool's reads and writes are
            // the proxy's own (the body spooled, then read back for delivery).
            .set("FilterCommand", "true")
            .set("FilterType", "file")
            .set("TempDirectory", &slow.mountpoint.display().to_string())
            .set("FilterTimeout", "60")
            .set("TimeOut", "60")
            .env("TOKIO_WORKER_THREADS", "1")
            .start();
        let addr = p.addr();

        let line = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;\r\n";
        let body = line.repeat(BODY_SIZE / line.len());
        let msg = message("slow spool", &body);
        let sent = msg.clone();
        let slow_session = thread::spawn(move || {
            let mut c = Client::open(addr);
            c.set_timeout(secs(90));
            let started = Instant::now();
            let reply = c.send_mail(&sent);
            (reply, started.elapsed())
        });

        // Probe while the body is on its way through the spool: from its first write
        // until the message is delivered.
        let spooling = common::wait_until(secs(20), || {
            fs::read_dir(&slow.mountpoint).is_ok_and(|mut d| d.next().is_some())
        });
        assert!(spooling, "the message never reached the spool");
        let mut worst = (Duration::ZERO, String::new());
        let mut probes = 0;
        while !slow_session.is_finished() {
            let (took, what) = probe(addr, probes);
            probes += 1;
            if took > worst.0 {
                worst = (took, what);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let (reply, slow_took) = slow_session.join().expect("slow session");
        assert_eq!(reply.code, 250, "the slow message: {reply:?}");
        // The spool really was slow: at least one write and one read call each.
        assert!(slow_took >= CALL_DELAY * 2, "spool not slow: {slow_took:?}");
        assert!(
            worst.0 < REPLY_BOUND,
            "a session that never touched the spool waited {:?} for its {} reply while a \
             message went through a spool whose calls take {CALL_DELAY:?} ({probes} probe \
             sessions, the message took {slow_took:?})",
            worst.0,
            worst.1
        );
        assert!(probes >= 3, "only {probes} probe sessions ran meanwhile");
        let m = up.expect_one();
        assert_bytes_eq!(m.content, msg);
        eprintln!(
            "{probes} probe sessions, slowest reply {:?} ({}), slow message {slow_took:?}",
            worst.0, worst.1
        );
    });
}
