//! What the scanner tests share: the GTUBE and EICAR test strings, a spam and a ham
//! message, and spamd's private configuration (tests/it/scanners.rs runs spamd behind
//! spamc, tests/it/real_milters.rs behind spamass-milter).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use super::message;

/// The GTUBE test string: rspamd and SpamAssassin treat a message holding it as spam.
pub const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// The EICAR anti-virus test string, put together at run time so that this source file
/// itself does not trip a scanner.
pub fn eicar() -> String {
    [
        r"X5O!P%@AP[4\PZX54(P^)7CC)7}$",
        "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*",
    ]
    .concat()
}

/// The name clamd gives our EICAR signature (custom signatures get `.UNOFFICIAL`).
pub const EICAR_SIGNATURE: &str = "Eicar-Test-Signature";

pub fn gtube_message() -> Vec<u8> {
    message(
        "gtube",
        format!("Buy now, limited offer.\r\n{GTUBE}\r\n").as_bytes(),
    )
}

pub fn ham_message() -> Vec<u8> {
    message(
        "lunch",
        b"Hi Bob,\r\n\r\nshall we meet for lunch on Thursday at noon?\r\n\r\nAlice\r\n",
    )
}

/// Writes spamd's private configuration under `dir` (not the machine's
/// /etc/spamassassin: the plugins the stock rules need, no Bayes, no learning; the rules
/// are the installed ones) and returns spamd's arguments to listen on 127.0.0.1:`port`
/// with `children` (min, max) processes.
pub fn spamd_args(dir: &Path, port: u16, children: (u32, u32)) -> std::io::Result<Vec<String>> {
    let home = dir.join("home");
    let site = dir.join("site");
    fs::create_dir(&home)?;
    // spamd's children drop to an unprivileged user when it is started as root.
    fs::set_permissions(&home, fs::Permissions::from_mode(0o777))?;
    fs::create_dir(&site)?;
    let plugins: String = [
        "Check",
        "BodyEval",
        "HeaderEval",
        "MIMEEval",
        "RelayEval",
        "URIEval",
        "HTMLEval",
        "WLBLEval",
        "DNSEval",
    ]
    .iter()
    .map(|p| format!("loadplugin Mail::SpamAssassin::Plugin::{p}\n"))
    .collect();
    fs::write(site.join("plugins.pre"), plugins)?;
    fs::write(site.join("local.cf"), "use_bayes 0\nbayes_auto_learn 0\n")?;
    Ok(vec![
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-A".into(),
        "127.0.0.1".into(),
        // Local tests only: no DNS blocklists nor other network checks.
        "-L".into(),
        // No per-user configuration; a private home for the helpers.
        "-x".into(),
        format!("--helper-home-dir={}", home.display()),
        format!("--siteconfigpath={}", site.display()),
        format!("--max-children={}", children.1),
        format!("--min-children={}", children.0),
        "--syslog=stderr".into(),
    ])
}

/// Whether spamd on 127.0.0.1:`port` answers spamc's ping (it listens before its
/// children are ready).
pub fn spamd_answers(spamc: &Path, port: u16) -> bool {
    super::command(spamc)
        .args(["-K", "-d", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success())
}
