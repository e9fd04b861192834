//! The binary started directly with arguments and environment of the test's choosing, for
//! tests that need what the [`super::Proxy`] launcher does not give: no `-d`, their own
//! config file, or watching the process from its first instant.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

pub struct Daemon {
    child: Option<Child>,
    pub pid: i32,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts the binary in `dir` with only PATH, LANG and `env` in its environment; stdout
    /// and stderr go to files in `dir`. Killed with its process group when dropped.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Daemon {
        Daemon::spawn_under(&[], args, env, dir)
    }

    /// Like [`Daemon::spawn`], with the binary started by `wrapper` (a program and its
    /// arguments, e.g. `unshare --pid --fork`); `pid` is then the wrapper's.
    pub fn spawn_under(
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> Daemon {
        let stdout = dir.join("daemon.stdout");
        let stderr = dir.join("daemon.stderr");
        let binary = super::binary();
        let mut argv: Vec<&std::ffi::OsStr> = wrapper.iter().map(|a| a.as_ref()).collect();
        argv.push(binary.as_os_str());
        argv.extend(args.iter().map(std::ffi::OsStr::new));
        let child = super::command(argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("LANG", "C")
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .process_group(0)
            .spawn()
            .expect("spawn proxsmtpd");
        let pid = child.id() as i32;
        super::register_process_group(pid);
        Daemon {
            child: Some(child),
            pid,
            stdout,
            stderr,
        }
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        super::wait_for(timeout, || self.exit_status())
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything the process wrote: its log (stderr with `-d`) and stdout.
    pub fn log(&self) -> String {
        format!("{}{}", self.stderr(), self.stdout())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = c.wait();
            super::unregister_process_group(self.pid);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- proxsmtpd stderr ----\n{}\n---- stdout ----\n{}\n----",
                self.stderr(),
                self.stdout()
            );
        }
    }
}
