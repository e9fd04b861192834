//! Running the filter command and watching it until it ends.
//!
//! The filter runs in its own process group so that everything it starts can be signalled
//! together: on timeout, after it exits (a forgotten background job must not linger), and
//! when the session that started it goes away.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Once;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};
use tokio::time::{sleep_until, timeout, Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::orphans;
use super::verdict::{Exit, StderrTracker};

/// How the message reaches the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The message on stdin, the filtered message on stdout.
    Pipe,
    /// The message in the file named by `EMAIL`, changed in place.
    File,
}

/// One run of the filter command.
pub(crate) struct FilterJob<'a> {
    /// The FilterCommand setting.
    pub(crate) command: &'a str,
    pub(crate) mode: Mode,
    /// FilterTimeout: the longest time without any sign of activity.
    pub(crate) timeout: Duration,
    /// The spool file with the message content.
    pub(crate) input: &'a Path,
    /// Pipe mode: `input` already open for reading from its start (else it is opened here).
    pub(crate) stdin: Option<std::fs::File>,
    /// Pipe mode: receives the filter's stdout.
    pub(crate) output: Option<std::fs::File>,
    /// SENDER, RECIPIENTS, CLIENT, SERVER, REMOTE, REMOTE_HELO, TMPDIR, EMAIL as applicable.
    pub(crate) env: Vec<(String, String)>,
}

/// How the run ended.
#[derive(Debug)]
pub(crate) struct FilterRun {
    pub(crate) exit: Exit,
    /// The last non-blank stderr line (or why the command could not be found).
    pub(crate) stderr_last: Option<String>,
    pub(crate) duration: Duration,
    /// The filter's pid, which is also its process group id.
    pub(crate) pid: Option<u32>,
}

/// Variables that belong to the filter contract: never inherited from the daemon, so that
/// a filter cannot mistake the daemon's own environment for message data.
const CONTRACT_VARS: [&str; 11] = [
    "SENDER",
    "RECIPIENTS",
    "EMAIL",
    "CLIENT",
    "SERVER",
    "REMOTE",
    "REMOTE_HELO",
    "TMPDIR",
    "TLS",
    "TLS_VERSION",
    "TLS_CIPHER",
];

/// Longest wait between SIGTERM and SIGKILL (less when FilterTimeout is shorter).
const KILL_GRACE: Duration = Duration::from_secs(3);
/// How long stderr is still read after the filter exited (a background job may hold it).
const STDERR_DRAIN: Duration = Duration::from_millis(200);
/// Longest interval between two checks of the output file's size.
const OUTPUT_POLL: Duration = Duration::from_millis(250);

/// Shell built-ins and reserved words: a command starting with one of these must go
/// through the shell even when it contains no shell syntax (`exit 1`, `echo -e x`).
const SHELL_WORDS: &[&str] = &[
    ".", ":", "[", "alias", "bg", "break", "case", "cd", "chdir", "command", "continue", "do",
    "done", "echo", "elif", "else", "esac", "eval", "exec", "exit", "export", "false", "fc", "fg",
    "fi", "for", "function", "getopts", "hash", "if", "in", "jobs", "kill", "local", "printf",
    "pwd", "read", "readonly", "return", "select", "set", "shift", "test", "then", "time", "times",
    "trap", "true", "type", "ulimit", "umask", "unalias", "unset", "until", "wait", "while",
];

/// Runs the filter and waits for it, at most FilterTimeout of inactivity.
///
/// Dropping the returned future kills the filter's whole process group; the exited
/// processes are then reaped by tokio in the background.
pub(crate) async fn execute(job: FilterJob<'_>) -> FilterRun {
    let started = Instant::now();
    restore_default_signals();
    if job.mode == Mode::File && !job.env.iter().any(|(k, _)| k == "EMAIL") {
        warn!("filter in file mode started without EMAIL");
    }
    let watched = match (job.mode, &job.output) {
        (Mode::Pipe, Some(file)) => file.try_clone().ok(),
        _ => None,
    };

    let stdin = open_input(&job).await;
    let start = || spawn(&job, &stdin);
    let (mut child, pid, _registration) = match orphans::spawn_registered(start, Child::id) {
        Ok((child, registration)) => {
            let pid = child.id();
            (child, pid, registration)
        }
        Err((exit, stderr_last)) => {
            return FilterRun {
                exit,
                stderr_last,
                duration: started.elapsed(),
                pid: None,
            };
        }
    };
    // Declared after `child` and the registration so that it drops first: the group is
    // killed, then tokio takes over reaping the child if `execute` did not finish, and the
    // orphan sweep looks for what left the group.
    let mut group = GroupGuard(pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw));
    debug!(pid, command = job.command, "started filter command");

    let mut stderr = child.stderr.take();
    let mut tracker = StderrTracker::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut ticker = tokio::time::interval(poll_interval(job.timeout));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut output_len = watched.as_ref().and_then(file_len);
    let mut deadline = deadline_after(job.timeout);

    let waited = loop {
        tokio::select! {
            status = child.wait() => break Some(status),
            read = read_some(&mut stderr, &mut buf) => match read {
                Ok(0) | Err(_) => stderr = None,
                Ok(n) => {
                    tracker.feed(&buf[..n]);
                    deadline = deadline_after(job.timeout);
                }
            },
            _ = ticker.tick(), if watched.is_some() => {
                let len = watched.as_ref().and_then(file_len);
                if len != output_len {
                    output_len = len;
                    deadline = deadline_after(job.timeout);
                }
            }
            _ = sleep_until(deadline) => break None,
        }
    };

    let exit = match waited {
        Some(Ok(status)) => {
            let _ = timeout(STDERR_DRAIN, drain(&mut stderr, &mut tracker, &mut buf)).await;
            exit_of(status)
        }
        Some(Err(e)) => Exit::SpawnFailed(format!("couldn't wait for filter command: {e}")),
        None => {
            warn!("timeout while listening to filter command");
            terminate(&mut child, &group, job.timeout).await;
            Exit::TimedOut
        }
    };
    // Whatever the filter left running in its group goes too (ESRCH when nothing is left).
    group.kill(Signal::SIGKILL);
    group.disarm();
    debug!(pid, ?exit, "filter command finished");
    FilterRun {
        exit,
        stderr_last: tracker.last_line(),
        duration: started.elapsed(),
        pid,
    }
}

/// SIGTERM to the group, a grace period, then SIGKILL, and the child reaped.
async fn terminate(child: &mut Child, group: &GroupGuard, filter_timeout: Duration) {
    let pid = child.id().unwrap_or_default();
    warn!("killing filter process (pid {pid})");
    group.kill(Signal::SIGTERM);
    if timeout(filter_timeout.min(KILL_GRACE), child.wait())
        .await
        .is_err()
    {
        warn!("process wouldn't quit. forced termination");
        group.kill(Signal::SIGKILL);
        // SIGKILL cannot be ignored; the bound only guards against a process stuck in the
        // kernel, which tokio will reap later once the child is dropped.
        let _ = timeout(KILL_GRACE, child.wait()).await;
    }
}

/// Kills the filter's process group when dropped while armed.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&self, signal: Signal) {
        if let Some(pgid) = self.0 {
            match killpg(pgid, signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => warn!("couldn't signal filter process group {pgid}: {e}"),
            }
        }
    }

    /// Called once the group has been killed and the child reaped: the id may be reused.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill(Signal::SIGKILL);
    }
}

/// The spool file for the filter's stdin (pipe mode), opened on the blocking pool: the
/// spool may be on a slow disk.
async fn open_input(job: &FilterJob<'_>) -> io::Result<Option<std::fs::File>> {
    if job.mode != Mode::Pipe {
        return Ok(None);
    }
    if let Some(file) = &job.stdin {
        return file.try_clone().map(Some);
    }
    let path = job.input.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    opened.map(Some).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("couldn't open {}: {e}", job.input.display()),
        )
    })
}

/// Starts the filter, mapping a direct exec's failures to what the shell would report.
/// `stdin` is what [`open_input`] opened.
fn spawn(
    job: &FilterJob,
    stdin: &io::Result<Option<std::fs::File>>,
) -> Result<Child, (Exit, Option<String>)> {
    let spawn_failed = |e: io::Error| (Exit::SpawnFailed(e.to_string()), None);
    let build = |argv| build(job, argv, stdin);
    match direct_argv(job.command) {
        Some(argv) => match build(Some(&argv)).map_err(spawn_failed)?.spawn() {
            Ok(child) => Ok(child),
            Err(e) if e.raw_os_error() == Some(Errno::ENOEXEC as i32) => {
                // An executable script without `#!`: sh runs such files itself.
                build(None)
                    .map_err(spawn_failed)?
                    .spawn()
                    .map_err(spawn_failed)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err((Exit::Code(127), Some(format!("{}: not found", argv[0]))))
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err((
                Exit::Code(126),
                Some(format!("{}: Permission denied", argv[0])),
            )),
            Err(e) => Err(spawn_failed(e)),
        },
        None => build(None)
            .map_err(spawn_failed)?
            .spawn()
            .map_err(spawn_failed),
    }
}

/// The command for `argv` (direct exec) or for `/bin/sh -c <command>`.
fn build(
    job: &FilterJob,
    argv: Option<&[&str]>,
    stdin: &io::Result<Option<std::fs::File>>,
) -> io::Result<Command> {
    let mut cmd = match argv {
        Some([program, args @ ..]) => {
            let mut cmd = Command::new(program);
            cmd.args(args);
            cmd
        }
        _ => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg0("sh").arg("-c").arg(job.command);
            cmd
        }
    };
    let (stdin, stdout) = match job.mode {
        Mode::Pipe => {
            let input = match stdin {
                Ok(Some(file)) => file.try_clone()?,
                Ok(None) => return Err(io::Error::other("no input for a pipe-mode filter")),
                Err(e) => return Err(io::Error::new(e.kind(), e.to_string())),
            };
            let output = match &job.output {
                Some(file) => Stdio::from(file.try_clone()?),
                None => Stdio::null(),
            };
            (Stdio::from(input), output)
        }
        Mode::File => (Stdio::null(), Stdio::null()),
    };
    for name in CONTRACT_VARS {
        cmd.env_remove(name);
    }
    for (name, value) in &job.env {
        cmd.env(name, env_value(value));
    }
    // std starts the child with SIGPIPE at its default; the signal mask is inherited, and
    // the daemon's threads keep theirs empty (`app::clear_inherited_signal_mask`); exec
    // resets caught signals and `restore_default_signals` covers ignored ones. All
    // descriptors the daemon opens are close-on-exec, so the filter inherits only 0, 1, 2.
    cmd.stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    Ok(cmd)
}

/// The words of a command that can be executed without a shell, or None.
///
/// A command made only of plain words (letters, digits and `_./,:=+@%-`, separated by
/// spaces or tabs) means the same to `sh -c` as an exec of those words with a PATH lookup,
/// as long as the first word is not a variable assignment, a reserved word or a built-in.
/// Running it directly saves a process, and the filter sees exactly what it would have
/// seen through the shell: the same argv, environment and descriptors.
fn direct_argv(command: &str) -> Option<Vec<&str>> {
    let plain = command
        .chars()
        .all(|c| c == ' ' || c == '\t' || c.is_ascii_alphanumeric() || "_./,:=+@%-".contains(c));
    let argv: Vec<&str> = command
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect();
    let first = *argv.first()?;
    let shell_word = !first.contains('/') && SHELL_WORDS.contains(&first);
    (plain && !first.contains('=') && !shell_word).then_some(argv)
}

/// Control characters other than LF are removed from values that come from the SMTP
/// session, so that an envelope value cannot smuggle terminal escapes or CRs into a
/// filter; LF stays because RECIPIENTS uses it as its separator.
fn env_value(value: &str) -> String {
    value
        .chars()
        .filter(|&c| c == '\n' || !c.is_control())
        .collect()
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(sig)) => Exit::Signal(sig),
        (None, None) => Exit::SpawnFailed(format!("unexpected exit status {status}")),
    }
}

/// Now plus `timeout`, without overflowing on an absurd setting.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

fn poll_interval(filter_timeout: Duration) -> Duration {
    (filter_timeout / 4).clamp(Duration::from_millis(10), OUTPUT_POLL)
}

fn file_len(file: &std::fs::File) -> Option<u64> {
    file.metadata().ok().map(|m| m.len())
}

/// Reads from stderr while it is open; never completes once it is closed.
async fn read_some(stderr: &mut Option<ChildStderr>, buf: &mut [u8]) -> io::Result<usize> {
    match stderr {
        Some(pipe) => pipe.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn drain(stderr: &mut Option<ChildStderr>, tracker: &mut StderrTracker, buf: &mut [u8]) {
    if let Some(pipe) = stderr {
        while let Ok(n @ 1..) = pipe.read(buf).await {
            tracker.feed(&buf[..n]);
        }
    }
}

/// Makes SIGHUP, SIGINT and SIGTERM default in filters even when the daemon was started
/// with them ignored (nohup, a background job of a script): an ignored signal stays
/// ignored across exec, a caught one does not. Safe Rust cannot set a disposition
/// directly, so each ignored one gets a tokio handler without listeners instead, which
/// for the daemon still amounts to ignoring it.
fn restore_default_signals() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return;
        };
        let ignored = ignored_mask(&status);
        for signal in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM] {
            if ignored & (1 << (signal as i32 - 1)) != 0 {
                let kind = tokio::signal::unix::SignalKind::from_raw(signal as i32);
                if let Err(e) = tokio::signal::unix::signal(kind) {
                    warn!("couldn't reset {signal} for filter commands: {e}");
                }
            }
        }
    });
}

/// The `SigIgn` mask of a `/proc/<pid>/status` text.
fn ignored_mask(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant as StdInstant;

    #[test]
    fn direct_exec_classification() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("cat", Some(&["cat"])),
            (
                "  /usr/bin/spamc  -E\t-x ",
                Some(&["/usr/bin/spamc", "-E", "-x"]),
            ),
            (
                "filter --to=a@b.c,d 50%",
                Some(&["filter", "--to=a@b.c,d", "50%"]),
            ),
            ("./relative/filter.sh", Some(&["./relative/filter.sh"])),
            ("/opt/bin/exit", Some(&["/opt/bin/exit"])),
            ("", None),
            (" \t ", None),
            ("cat | tr a b", None),
            ("filter \"$SENDER\"", None),
            ("filter $SENDER", None),
            ("filter > /tmp/x", None),
            ("filter; true", None),
            ("filter *.txt", None),
            ("filter ~/x", None),
            ("filter 'a b'", None),
            ("filter\nother", None),
            ("FOO=bar filter", None),
            ("exit 1", None),
            ("echo -e x", None),
            ("true", None),
            ("if", None),
            ("filter # comment", None),
            ("filtér", None),
        ];
        for (command, want) in cases {
            let got = direct_argv(command);
            assert_eq!(got.as_deref(), *want, "{command:?}");
        }
    }

    #[test]
    fn env_values_lose_control_characters_but_lf() {
        let cases: &[(&str, &str)] = &[
            ("a@b.c", "a@b.c"),
            ("a@b.c\nd@e.f", "a@b.c\nd@e.f"),
            ("evil\r\nX-Injected: 1", "evil\nX-Injected: 1"),
            ("esc\x1b[2Jtab\there\0nul\u{85}", "esc[2Jtabherenul"),
            ("ünïcode", "ünïcode"),
        ];
        for (value, want) in cases {
            assert_eq!(env_value(value), *want);
        }
    }

    #[test]
    fn sigign_parsing() {
        let cases: &[(&str, u64)] = &[
            ("Name:\tx\nSigIgn:\t0000000000001000\nSigCgt:\t0\n", 0x1000),
            ("SigIgn:\t0000000000004003\n", 0x4003),
            ("SigIgn:\tzz\n", 0),
            ("", 0),
        ];
        for (status, want) in cases {
            assert_eq!(ignored_mask(status), *want);
        }
    }

    #[tokio::test]
    async fn absurd_timeouts_do_not_panic() {
        let _ = deadline_after(Duration::MAX);
        let f = fixture("");
        let out = execute(f.pipe_job("true", Duration::MAX)).await;
        assert_eq!(out.exit, Exit::Code(0));
        let out = execute(f.pipe_job("sleep 1", Duration::ZERO)).await;
        assert_eq!(out.exit, Exit::TimedOut);
    }

    #[test]
    fn poll_intervals() {
        let cases: &[(u64, u64)] = &[(0, 10), (20, 10), (400, 100), (1000, 250), (30_000, 250)];
        for (timeout_ms, want_ms) in cases {
            assert_eq!(
                poll_interval(Duration::from_millis(*timeout_ms)),
                Duration::from_millis(*want_ms)
            );
        }
    }

    // ---- real processes ----

    struct Fixture {
        dir: tempfile::TempDir,
        input: std::path::PathBuf,
        output: std::path::PathBuf,
    }

    fn fixture(content: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input");
        let output = dir.path().join("output");
        std::fs::write(&input, content).unwrap();
        Fixture { dir, input, output }
    }

    impl Fixture {
        fn pipe_job<'a>(&'a self, command: &'a str, timeout: Duration) -> FilterJob<'a> {
            FilterJob {
                command,
                mode: Mode::Pipe,
                timeout,
                input: &self.input,
                stdin: None,
                output: Some(std::fs::File::create(&self.output).unwrap()),
                env: vec![],
            }
        }

        fn output(&self) -> String {
            std::fs::read_to_string(&self.output).unwrap()
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    /// Live (non-zombie) processes in process group `pgid`.
    fn group_members(pgid: u32) -> Vec<u32> {
        let mut members = vec![];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the parenthesised command name: state ppid pgrp ...
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let fields: Vec<&str> = rest.split(' ').collect();
            if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
                members.push(pid);
            }
        }
        members
    }

    /// Waits up to 2 s for the group to be empty (SIGKILL is delivered asynchronously).
    async fn assert_group_gone(pgid: u32) {
        for _ in 0..100 {
            if group_members(pgid).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("processes left in group {pgid}: {:?}", group_members(pgid));
    }

    #[tokio::test]
    async fn pipe_mode_copies_input_to_output_direct_and_through_sh() {
        let message = "Subject: hi\r\n\r\nbody line\r\n.leading dot\r\n";
        for command in ["cat", "cat | cat", "/bin/cat -"] {
            let f = fixture(message);
            let out = execute(f.pipe_job(command, LONG)).await;
            assert_eq!(out.exit, Exit::Code(0), "{command}");
            assert_eq!(out.stderr_last, None);
            assert_eq!(f.output(), message, "{command}");
            assert_group_gone(out.pid.unwrap()).await;
        }
    }

    #[tokio::test]
    async fn file_mode_edits_the_file_in_place() {
        let f = fixture("Subject: foo\n\nfoo bar\n");
        let email = f.input.to_str().unwrap().to_string();
        let job = FilterJob {
            command: r#"test -z "$(cat)" && sed -i s/foo/baz/g "$EMAIL""#,
            mode: Mode::File,
            timeout: LONG,
            input: &f.input,
            stdin: None,
            output: None,
            env: vec![("EMAIL".into(), email)],
        };
        let out = execute(job).await;
        assert_eq!(out.exit, Exit::Code(0));
        assert_eq!(
            std::fs::read_to_string(&f.input).unwrap(),
            "Subject: baz\n\nbaz bar\n"
        );
    }

    #[tokio::test]
    async fn environment_is_the_daemons_minus_contract_vars_plus_the_jobs() {
        // The only test that changes the process environment, with names no other uses.
        std::env::set_var("SENDER", "inherited@example.org");
        std::env::set_var("REMOTE_HELO", "inherited.example.org");
        std::env::set_var("PROXSMTPD_TEST_KEEP", "kept");
        let env = vec![
            ("SENDER".to_string(), "<>".to_string()),
            ("RECIPIENTS".to_string(), "a@x.org\nb@y.org".to_string()),
            ("CLIENT".to_string(), "192.0.2.1\r\x1b".to_string()),
        ];

        // Direct exec: `env` prints the whole environment.
        let f = fixture("");
        let out = execute(FilterJob {
            env: env.clone(),
            ..f.pipe_job("env", LONG)
        })
        .await;
        assert_eq!(out.exit, Exit::Code(0));
        let printed = f.output();
        let lines: Vec<&str> = printed.lines().collect();
        for want in [
            "SENDER=<>",
            "RECIPIENTS=a@x.org",
            "b@y.org",
            "CLIENT=192.0.2.1",
        ] {
            assert!(lines.contains(&want), "{want} missing in {printed}");
        }
        assert!(lines.contains(&"PROXSMTPD_TEST_KEEP=kept"), "{printed}");
        assert!(!printed.contains("inherited"), "{printed}");
        assert!(!printed.contains('\r') && !printed.contains('\x1b'));

        // Through sh, with exact values.
        let f = fixture("");
        let command = r#"printf '[%s]' "$SENDER" "$RECIPIENTS" "$CLIENT" "${REMOTE_HELO-unset}""#;
        let out = execute(FilterJob {
            env,
            ..f.pipe_job(command, LONG)
        })
        .await;
        assert_eq!(out.exit, Exit::Code(0));
        assert_eq!(f.output(), "[<>][a@x.org\nb@y.org][192.0.2.1][unset]");
        std::env::remove_var("SENDER");
        std::env::remove_var("REMOTE_HELO");
        std::env::remove_var("PROXSMTPD_TEST_KEEP");
    }

    #[tokio::test]
    async fn exit_codes_signals_and_stderr() {
        let cases: &[(&str, Exit, Option<&str>)] = &[
            ("exit 0", Exit::Code(0), None),
            ("true", Exit::Code(0), None),
            ("false", Exit::Code(1), None),
            (
                "echo 'virus found' >&2; exit 1",
                Exit::Code(1),
                Some("virus found"),
            ),
            (
                "printf 'first\\n  554 5.7.1 spam  \\n\\n' >&2; exit 1",
                Exit::Code(1),
                Some("554 5.7.1 spam"),
            ),
            (
                "echo '451 later' >&2; exit 75",
                Exit::Code(75),
                Some("451 later"),
            ),
            ("kill -9 $$", Exit::Signal(9), None),
            ("kill -TERM $$", Exit::Signal(15), None),
            ("cat >/dev/null; kill -USR1 $$", Exit::Signal(10), None),
            // Exits at once without reading its stdin: nothing to clean up, stdin is a file.
            ("head -c 1", Exit::Code(0), None),
        ];
        for (command, exit, stderr) in cases {
            let f = fixture(&"x".repeat(1 << 20));
            let out = execute(f.pipe_job(command, LONG)).await;
            assert_eq!(&out.exit, exit, "{command}");
            assert_eq!(out.stderr_last.as_deref(), *stderr, "{command}");
        }
    }

    #[tokio::test]
    async fn missing_or_unrunnable_commands() {
        let f = fixture("");
        let not_exec = f.dir.path().join("not-executable");
        std::fs::write(&not_exec, "#!/bin/sh\nexit 0\n").unwrap();
        let no_shebang = f.dir.path().join("no-shebang");
        std::fs::write(&no_shebang, "echo 'from script' >&2; exit 3\n").unwrap();
        let mut perm = std::fs::metadata(&no_shebang).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&no_shebang, perm).unwrap();
        let not_exec = not_exec.to_str().unwrap();
        let no_shebang = no_shebang.to_str().unwrap();
        let through_sh = format!("{not_exec} >/dev/null");

        let cases: &[(&str, Exit, &str)] = &[
            ("no-such-filter-cmd --x", Exit::Code(127), "not found"),
            ("/nonexistent/filter", Exit::Code(127), "not found"),
            (
                "no-such-filter-cmd >/dev/null",
                Exit::Code(127),
                "not found",
            ),
            (not_exec, Exit::Code(126), "Permission denied"),
            (&through_sh, Exit::Code(126), "Permission denied"),
            (no_shebang, Exit::Code(3), "from script"),
        ];
        for (command, exit, stderr) in cases {
            let out = execute(f.pipe_job(command, LONG)).await;
            assert_eq!(&out.exit, exit, "{command}");
            let last = out.stderr_last.unwrap_or_default();
            assert!(last.contains(stderr), "{command}: {last}");
        }

        let missing_input = FilterJob {
            input: Path::new("/nonexistent/spool"),
            stdin: None,
            ..f.pipe_job("cat", LONG)
        };
        let out = execute(missing_input).await;
        assert!(matches!(out.exit, Exit::SpawnFailed(_)), "{:?}", out.exit);
        assert_eq!(out.pid, None);
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn hundred_megabytes_of_stderr_stay_bounded() {
        let x255 = "x".repeat(255);
        let cases: &[(&str, &str)] = &[
            // One 100 MB line that ends with the code: only its first 255 bytes are kept.
            (
                r"head -c 100000000 /dev/zero | tr '\0' x >&2; echo '554 no' >&2; exit 1",
                &x255,
            ),
            (
                r"head -c 100000000 /dev/zero | tr '\0' x >&2; printf '\n554 no\n' >&2; exit 1",
                "554 no",
            ),
        ];
        for (command, want) in cases {
            let f = fixture("");
            let before = rss_kib();
            let out = execute(f.pipe_job(command, LONG)).await;
            assert_eq!(out.exit, Exit::Code(1));
            assert_eq!(out.stderr_last.as_deref(), Some(*want));
            assert!(rss_kib() < before + 20 * 1024, "memory grew");
        }
    }

    #[tokio::test]
    async fn timeout_kills_a_filter_that_ignores_sigterm() {
        let f = fixture("");
        let timeout = Duration::from_secs(1);
        let started = StdInstant::now();
        let command = "trap '' TERM; sleep 60 & sleep 60";
        let out = execute(f.pipe_job(command, timeout)).await;
        assert_eq!(out.exit, Exit::TimedOut);
        // 1 s of inactivity, 1 s of grace (min(timeout, 3 s)), then SIGKILL.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert!(started.elapsed() >= Duration::from_secs(2));
        let pid = out.pid.unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child not reaped"
        );
        assert_group_gone(pid).await;
    }

    #[tokio::test]
    async fn timeout_is_for_inactivity_only() {
        let timeout = Duration::from_millis(800);
        let cases = [
            // Output to stdout keeps a pipe-mode filter alive...
            "for i in 1 2 3 4 5 6; do echo $i; sleep 0.3; done",
            // ...and so does stderr.
            "for i in 1 2 3 4 5 6; do echo $i >&2; sleep 0.3; done",
        ];
        for command in cases {
            let f = fixture("");
            let out = execute(f.pipe_job(command, timeout)).await;
            assert_eq!(out.exit, Exit::Code(0), "{command}");
            assert!(out.duration > Duration::from_millis(1500));
        }
        // In file mode only stderr counts.
        let f = fixture("");
        let email = f.input.to_str().unwrap().to_string();
        let job = FilterJob {
            command: r#"for i in 1 2 3 4 5 6; do echo $i >> "$EMAIL"; sleep 0.3; done"#,
            mode: Mode::File,
            timeout,
            input: &f.input,
            stdin: None,
            output: None,
            env: vec![("EMAIL".into(), email)],
        };
        assert_eq!(execute(job).await.exit, Exit::TimedOut);
    }

    #[tokio::test]
    async fn lingering_grandchild_neither_blocks_nor_survives() {
        let f = fixture("");
        let started = StdInstant::now();
        let out = execute(f.pipe_job("(sleep 30 &) ; echo done >&2; exit 0", LONG)).await;
        assert_eq!(out.exit, Exit::Code(0));
        assert_eq!(out.stderr_last.as_deref(), Some("done"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_group_gone(out.pid.unwrap()).await;
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_group() {
        let f = fixture("");
        let pid_file = f.dir.path().join("pid");
        let command = format!("echo $$ > {}; sleep 60 & sleep 60", pid_file.display());
        let job = f.pipe_job(&command, LONG);
        let dropped = tokio::time::timeout(Duration::from_millis(500), execute(job)).await;
        assert!(dropped.is_err(), "filter should still be running");
        let mut pid = String::new();
        std::fs::File::open(&pid_file)
            .unwrap()
            .read_to_string(&mut pid)
            .unwrap();
        assert_group_gone(pid.trim().parse().unwrap()).await;
    }

    #[tokio::test]
    async fn filter_gets_default_signal_dispositions() {
        let f = fixture("");
        let out = execute(f.pipe_job("grep SigIgn /proc/self/status", LONG)).await;
        assert_eq!(out.exit, Exit::Code(0));
        let mask = ignored_mask(&f.output());
        for sig in [
            Signal::SIGHUP,
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGPIPE,
        ] {
            assert_eq!(mask & (1 << (sig as i32 - 1)), 0, "{sig} ignored");
        }
    }
}
