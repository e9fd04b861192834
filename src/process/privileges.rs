//! Dropping root privileges to the `User` setting.

use nix::unistd::{self, Gid, Uid, User};

/// Switches the whole process (every thread) to `user`, a user name or a numeric uid (numeric
/// when it parses fully as a number), with that user's primary group as its only group.
///
/// Call it after the listener is bound, so ports below 1024 need no capability, and before
/// the first connection is accepted.
///
/// Returns warnings to log: when not started as root nothing changes (the original's
/// `must be started as root to switch to user: <x>`), and when `user` is root itself.
/// Errors (unknown user, a failed switch, root still regainable) are fatal.
///
/// With `keep_net_admin` (TransparentProxy full) the process keeps CAP_NET_ADMIN and
/// nothing else, as the original did: connecting from the client's address needs
/// IP_TRANSPARENT on every upstream socket. Capabilities are per thread, so this must run
/// before any other thread exists (before the tokio runtime starts): threads created later
/// inherit them.
pub(crate) fn drop_to_user(user: &str, keep_net_admin: bool) -> Result<Vec<String>, String> {
    let entry = lookup(user)?;
    if !unistd::geteuid().is_root() {
        return Ok(vec![format!(
            "must be started as root to switch to user: {user}"
        )]);
    }
    let failed =
        |what: &str, e: nix::Error| format!("couldn't switch to user: {user}: {what}: {e}");
    if keep_net_admin {
        nix::sys::prctl::set_keepcaps(true).map_err(|e| failed("keep capabilities", e))?;
    }
    // Supplementary groups go too: root's groups (disk, shadow, ...) must not outlive the
    // switch. The original kept them.
    unistd::setgroups(&[entry.gid]).map_err(|e| failed("setgroups", e))?;
    unistd::setresgid(entry.gid, entry.gid, entry.gid).map_err(|e| failed("setgid", e))?;
    unistd::setresuid(entry.uid, entry.uid, entry.uid).map_err(|e| failed("setuid", e))?;
    if keep_net_admin {
        let only = caps::CapsHashSet::from([caps::Capability::CAP_NET_ADMIN]);
        for set in [caps::CapSet::Permitted, caps::CapSet::Effective] {
            caps::set(None, set, &only)
                .map_err(|e| format!("couldn't switch to user: {user}: capabilities: {e}"))?;
        }
        nix::sys::prctl::set_keepcaps(false).map_err(|e| failed("keep capabilities", e))?;
    }
    if entry.uid.is_root() {
        return Ok(vec![root_warning()]);
    }
    if unistd::setuid(Uid::from_raw(0)).is_ok() || unistd::setgid(Gid::from_raw(0)).is_ok() {
        return Err(format!(
            "couldn't switch to user: {user}: root privileges can still be regained"
        ));
    }
    Ok(Vec::new())
}

/// The original's warning for running as root, when the process does: for use when no
/// `User` is configured.
pub(crate) fn root_warning_if_root() -> Option<String> {
    unistd::geteuid().is_root().then(root_warning)
}

fn root_warning() -> String {
    "running as root is NOT recommended".to_string()
}

fn lookup(user: &str) -> Result<User, String> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    match found {
        Ok(Some(entry)) => Ok(entry),
        Ok(None) | Err(_) => Err(format!("couldn't look up user: {user}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let cases = [
            ("root", Ok(0)),
            ("0", Ok(0)),
            ("daemon", Ok(1)),
            ("1", Ok(1)),
            ("no-such-user-proxsmtpd", Err(())),
            ("4294967290", Err(())),
            ("", Err(())),
            ("-1", Err(())),
        ];
        for (user, want) in cases {
            let got = lookup(user).map(|u| u.uid.as_raw()).map_err(|e| {
                assert_eq!(e, format!("couldn't look up user: {user}"));
            });
            assert_eq!(got, want, "{user:?}");
        }
    }

    #[test]
    fn unknown_user_is_an_error() {
        assert_eq!(
            drop_to_user("no-such-user-proxsmtpd", false),
            Err("couldn't look up user: no-such-user-proxsmtpd".to_string())
        );
    }

    /// Set in the child process that [`drop_in_a_child_process`] starts.
    const CHILD: &str = "PROXSMTPD_TEST_PRIVILEGE_CHILD";

    /// Dropping privileges is irreversible and affects every thread, so it runs in a child
    /// process: this test binary again, running only [`child`].
    #[test]
    fn drop_in_a_child_process() {
        if !unistd::geteuid().is_root() {
            // Only the warning path can be shown without root.
            assert_eq!(
                drop_to_user("nobody", false),
                Ok(vec![
                    "must be started as root to switch to user: nobody".to_string()
                ])
            );
            return;
        }
        let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("{module}::child"), "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("privileges dropped"),
            "child: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let nobody = lookup("nobody").unwrap();
        assert_eq!(drop_to_user(&nobody.uid.to_string(), false), Ok(Vec::new()));
        assert_eq!(unistd::getuid(), nobody.uid);
        assert_eq!(unistd::geteuid(), nobody.uid);
        assert_eq!(unistd::getgid(), nobody.gid);
        assert_eq!(unistd::getegid(), nobody.gid);
        assert_eq!(unistd::getgroups().unwrap(), vec![nobody.gid]);
        assert!(unistd::setuid(Uid::from_raw(0)).is_err());
        // Once switched, a second call only warns.
        assert_eq!(
            drop_to_user("nobody", false),
            Ok(vec![
                "must be started as root to switch to user: nobody".to_string()
            ])
        );
        assert_eq!(root_warning_if_root(), None);
        // Proves to the parent that this test, not an empty selection, ran.
        println!("privileges dropped");
    }
}
