//! Can FilterCommand run at all? The readiness check `filter` (`/readyz`): a command naming
//! a script or program that does not exist or is not executable would defer every message
//! with `451 Local Error`, so such a pod must not get traffic.
//!
//! The command is read the way `/bin/sh -c` reads a simple command: leading `NAME=value`
//! assignments, `exec` and `env` are skipped, and `sh -c 'COMMAND'` (also `bash`, `dash`)
//! is looked into. The first word left is the program: a path (absolute or relative, it
//! contains a `/`) must be an executable file; a bare name must be a shell builtin or found
//! in `PATH`. A command using shell syntax that cannot be analysed without running it
//! (expansions, pipelines, lists, redirections, globs) is assumed runnable.

use std::path::{Path, PathBuf};

use crate::config::{FilterType, Settings};

/// The shells whose `-c` argument is analysed in turn.
const SHELLS: &[&str] = &["sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "busybox"];

/// Builtins and reserved words: always there.
const BUILTINS: &[&str] = &[
    ":", ".", "true", "false", "echo", "printf", "exit", "return", "test", "[", "read", "set",
    "unset", "export", "readonly", "local", "cd", "pwd", "eval", "command", "trap", "wait", "kill",
    "shift", "times", "ulimit", "umask", "type", "hash", "getopts", "alias", "unalias", "if",
    "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac", "!", "{",
    "}", "source",
];

/// Whether the configured filter can run (always, without a filter or in `reject` mode);
/// the error says why not.
pub(crate) fn filter_ready(settings: &Settings) -> Result<(), String> {
    if settings.filter_type == FilterType::Reject {
        return Ok(());
    }
    match settings.filter_command.as_deref() {
        Some(command) => check(command, std::env::var_os("PATH").as_deref()),
        None => Ok(()),
    }
}

/// Checks `command` with the given `PATH` value.
pub(crate) fn check(command: &str, path_var: Option<&std::ffi::OsStr>) -> Result<(), String> {
    match program(command, 0) {
        Some(Program::Path(path)) => check_executable(&path),
        Some(Program::Name(name)) => {
            if BUILTINS.contains(&name.as_str()) || find_in_path(&name, path_var).is_some() {
                Ok(())
            } else {
                Err(format!("FilterCommand: {name}: not found in PATH"))
            }
        }
        None => Ok(()),
    }
}

/// The script a filter command runs, when its program is a path (for the file watcher).
pub(crate) fn script_path(command: &str) -> Option<PathBuf> {
    match program(command, 0)? {
        Program::Path(path) => Some(path),
        Program::Name(_) => None,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Program {
    /// Contains a `/`: used as it is.
    Path(PathBuf),
    /// Looked up among builtins and in PATH.
    Name(String),
}

/// The program `command` runs, or `None` when that cannot be told without running it (or
/// nothing runs: an empty command or only assignments).
fn program(command: &str, depth: u8) -> Option<Program> {
    let words = words(command)?;
    let mut rest = words.as_slice();
    loop {
        while rest.first().is_some_and(|w| is_assignment(w)) {
            rest = &rest[1..];
        }
        match rest.first().map(String::as_str) {
            Some("exec") | Some("env") => rest = &rest[1..],
            _ => break,
        }
        // Options of exec or env (`env -i`, `exec -a name`) change what follows.
        if rest.first().is_some_and(|w| w.starts_with('-')) {
            return None;
        }
    }
    let first = rest.first()?;
    let base = first.rsplit('/').next().unwrap_or(first);
    if SHELLS.contains(&base) && depth < 4 {
        if let Some(script) = shell_command_string(&rest[1..]) {
            // The shell itself must run too.
            return match program_word(first) {
                Program::Path(p) if check_executable(&p).is_err() => Some(Program::Path(p)),
                _ => program(script, depth + 1),
            };
        }
    }
    Some(program_word(first))
}

fn program_word(word: &str) -> Program {
    if word.contains('/') {
        Program::Path(PathBuf::from(word))
    } else {
        Program::Name(word.to_string())
    }
}

/// The command string of `sh -c STRING` (`-c` possibly among other single-letter options,
/// as in `-ec`); `None` when the shell runs a script file or reads stdin instead.
fn shell_command_string(args: &[String]) -> Option<&str> {
    let mut i = 0;
    let mut has_c = false;
    while let Some(arg) = args.get(i) {
        match arg.strip_prefix('-') {
            Some(flags) if !flags.is_empty() && flags.chars().all(|c| c.is_ascii_alphabetic()) => {
                has_c |= flags.contains('c');
                i += 1;
            }
            _ => break,
        }
    }
    if has_c {
        args.get(i).map(String::as_str)
    } else {
        None
    }
}

/// `NAME=value` before the program.
fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            let mut chars = name.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    }
}

/// Splits a simple command into words with sh's quoting (single quotes, double quotes,
/// backslash); `None` at anything that needs the shell to interpret it.
fn words(command: &str) -> Option<Vec<String>> {
    const SPECIAL: &str = "$`;|&()<>{}*?[]~!\n";
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '$' | '`' | '\\' => return None,
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next()? {
                    '\n' => return None,
                    c => word.push(c),
                }
            }
            c if SPECIAL.contains(c) => return None,
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

/// A path the filter can execute: an existing regular file (after symlinks) with execute
/// permission for this process.
fn check_executable(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("FilterCommand: {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("FilterCommand: {shown}: not a regular file"));
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| format!("FilterCommand: {shown}: not executable: {e}"))
}

/// `name` in the directories of `PATH` (an empty entry is the current directory).
fn find_in_path(name: &str, path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(name)
            } else {
                dir.join(name)
            }
        })
        .find(|candidate| check_executable(candidate).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn finds_the_program() {
        let p = |s: &str| Some(Program::Path(PathBuf::from(s)));
        let n = |s: &str| Some(Program::Name(s.to_string()));
        let table: &[(&str, Option<Program>)] = &[
            ("/etc/filter.sh", p("/etc/filter.sh")),
            ("/etc/filter.sh --reject 5", p("/etc/filter.sh")),
            ("  ./f.sh", p("./f.sh")),
            (
                "SPAMC_LIMIT=5 /usr/local/bin/spam.sh",
                p("/usr/local/bin/spam.sh"),
            ),
            ("A=1 B='x y' exec /x/f", p("/x/f")),
            ("env A=1 /x/f", p("/x/f")),
            ("env -i /x/f", None),
            ("cat", n("cat")),
            ("'/my dir/f.sh' arg", p("/my dir/f.sh")),
            ("\"/my dir/f.sh\"", p("/my dir/f.sh")),
            ("/my\\ dir/f.sh", p("/my dir/f.sh")),
            ("sh -c '/x/f --y'", p("/x/f")),
            ("/bin/sh -ec 'A=1 /x/f'", p("/x/f")),
            ("bash -c \"exec /x/f\"", p("/x/f")),
            ("sh -c 'sh -c /x/f'", p("/x/f")),
            ("sh /x/script.sh", n("sh")),
            ("sh -c", n("sh")),
            ("", None),
            ("A=1", None),
            ("# only a comment", None),
            ("/x/f # comment", p("/x/f")),
            ("echo run >> /tmp/runs; cat", None),
            ("$HOME/f.sh", None),
            ("cat | /x/f", None),
            ("/x/f 2>/dev/null", None),
            ("/x/f*", None),
            ("'unterminated", None),
            ("sh -c '$X'", None),
        ];
        for (command, want) in table {
            assert_eq!(&program(command, 0), want, "{command:?}");
        }
    }

    #[test]
    fn checks_files_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("filter.sh");
        std::fs::write(&exe, "#!/bin/sh\ncat\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("plain.sh");
        std::fs::write(&plain, "cat\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path_var = std::ffi::OsString::from(format!("/nonexistent:{}", dir.path().display()));
        let path = Some(path_var.as_os_str());
        let exe = exe.display();
        let plain = plain.display();
        let d = dir.path().display();
        let ok: &[String] = &[
            format!("{exe}"),
            format!("X=1 {exe} --arg"),
            format!("sh -c '{exe}'"),
            "filter.sh".into(),
            "true".into(),
            "A=1 B=2".into(),
            "echo x | nothing-such".into(),
        ];
        for command in ok {
            assert_eq!(check(command, path), Ok(()), "{command}");
        }
        let failing: &[(String, &str)] = &[
            (format!("{d}/missing.sh"), "No such file"),
            (format!("X=1 {d}/missing.sh"), "No such file"),
            (format!("sh -c '{d}/missing.sh --x'"), "No such file"),
            (format!("{plain}"), "not executable"),
            (format!("{d}"), "not a regular file"),
            ("plain.sh".into(), "not found in PATH"),
            ("no-such-filter-program".into(), "not found in PATH"),
            (format!("{d}/nosh -c /bin/cat"), "No such file"),
        ];
        // As root, access(X_OK) passes for a file with any x bit only.
        for (command, why) in failing {
            let got = check(command, path);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{command}: {got:?}"
            );
        }
        assert_eq!(check("cat", None).map_err(|_| ()), Err(()));
    }
}
