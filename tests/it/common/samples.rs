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

/// Standard base64 with padding, lines of 76 characters (as MIME wants).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for (i, chunk) in data.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.push_str("\r\n");
        }
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A multipart message whose attachment is the EICAR string, base64-encoded (so a match
/// needs clamd's MIME decoding, not a plain search of the bytes).
pub fn eicar_attachment_message() -> Vec<u8> {
    let encoded = base64(eicar().as_bytes());
    assert!(!encoded.contains("EICAR"), "the attachment must be encoded");
    format!(
        "From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: the file\r\n\
         Message-ID: <attachment@test.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThe file you asked for.\r\n\
         --b1\r\nContent-Type: application/octet-stream; name=\"tool.com\"\r\n\
         Content-Disposition: attachment; filename=\"tool.com\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n--b1--\r\n"
    )
    .into_bytes()
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
