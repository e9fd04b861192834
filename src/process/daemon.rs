//! Running in the background (without `-d`) and the pid file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Detaches from the terminal the way the original's `daemon(0, 0)` does: fork (the parent
/// exits 0 at once, which is what systemd's `Type=forking` waits for), setsid, chdir to `/`,
/// stdin, stdout and stderr to /dev/null.
///
/// Must be called while the process has a single thread, so before the tokio runtime (or
/// any other thread) starts: fork copies only the calling thread, and the runtime's worker
/// threads would be missing in the child. Relative paths (config, pid file, TempDirectory)
/// must be resolved before, since the working directory becomes `/`.
pub(crate) fn daemonize() -> Result<(), String> {
    nix::unistd::daemon(false, false).map_err(|e| format!("couldn't run as daemon: {e}"))
}

/// A pid file: the process id in decimal and a line feed, removed again when dropped.
#[derive(Debug)]
pub(crate) struct PidFile {
    path: Option<PathBuf>,
}

impl PidFile {
    /// Writes the current process id to `path`, replacing an older file. Write it after
    /// [`daemonize`], so it holds the daemon's pid.
    pub(crate) fn write(path: impl AsRef<Path>) -> io::Result<PidFile> {
        let path = path.as_ref();
        fs::write(path, format!("{}\n", std::process::id()))?;
        Ok(PidFile {
            path: Some(path.to_path_buf()),
        })
    }

    /// Removes the file now, reporting failure (dropping removes it silently).
    pub(crate) fn remove(mut self) -> io::Result<()> {
        match self.path.take() {
            Some(path) => fs::remove_file(path),
            None => Ok(()),
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let want = format!("{}\n", std::process::id());

        let dropped = dir.path().join("dropped.pid");
        fs::write(&dropped, "stale contents that are longer\n").unwrap();
        let file = PidFile::write(&dropped).unwrap();
        assert_eq!(fs::read_to_string(&dropped).unwrap(), want);
        drop(file);
        assert!(!dropped.exists());

        let removed = dir.path().join("removed.pid");
        let file = PidFile::write(&removed).unwrap();
        assert_eq!(fs::read_to_string(&removed).unwrap(), want);
        file.remove().unwrap();
        assert!(!removed.exists());

        // Someone else removed it first: explicit removal reports it, drop stays quiet.
        let gone = dir.path().join("gone.pid");
        let file = PidFile::write(&gone).unwrap();
        fs::remove_file(&gone).unwrap();
        assert_eq!(file.remove().unwrap_err().kind(), io::ErrorKind::NotFound);

        assert!(PidFile::write(dir.path().join("missing/dir.pid")).is_err());
    }

    /// Set, to the report file's path, in the child process of [`daemonizes`].
    const CHILD: &str = "PROXSMTPD_TEST_DAEMON_CHILD";

    /// fork and setsid happen to the whole test binary, so this runs it again as a child
    /// that runs only [`daemon_child`].
    #[test]
    fn daemonizes() {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report");
        let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("{module}::daemon_child"),
                "--test-threads=1",
            ])
            .env(CHILD, &report)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let child_pid = child.id();
        // The foreground process returns as soon as the daemon is forked off.
        assert!(child.wait().unwrap().success());
        let mut text = String::new();
        for _ in 0..500 {
            text = fs::read_to_string(&report).unwrap_or_default();
            if text.ends_with('\n') {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "report {text:?}");
        assert_ne!(
            lines[0],
            child_pid.to_string(),
            "the daemon is a new process"
        );
        assert_eq!(lines[1], lines[0], "the daemon leads its own session");
        assert_eq!(lines[2], "/");
        assert_eq!(lines[3], "/dev/null");
    }

    #[test]
    fn daemon_child() {
        let Some(report) = std::env::var_os(CHILD) else {
            return;
        };
        daemonize().unwrap();
        let pid = nix::unistd::getpid();
        let text = format!(
            "{}\n{}\n{}\n{}\n",
            pid,
            nix::unistd::getsid(None).map_or(-1, |sid| sid.as_raw()),
            std::env::current_dir().unwrap().display(),
            fs::read_link("/proc/self/fd/0").unwrap().display(),
        );
        // Written in one go under a temporary name, so the parent never reads half of it.
        let partial = PathBuf::from(&report).with_extension("partial");
        fs::write(&partial, text).unwrap();
        fs::rename(&partial, &report).unwrap();
        std::process::exit(0);
    }
}
