//! A shortened load soak (scripts/soak.sh): 2,000 messages at concurrency 16 through a
//! filter that randomly accepts, rejects, drops and fails. The account must be exact
//! (messages at the upstream + rejections + drops + temporary failures == messages sent,
//! and the upstream holds exactly what clients were told was accepted), and the proxy's
//! memory must not grow without bound. No timing is asserted.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use crate::common::timed;

fn run_soak(messages: u32, concurrency: u32) -> Option<HashMap<String, i64>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/soak.sh");
    let out = common::command("bash")
        .arg(&script)
        .args(["--messages", &messages.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--rss-interval", "0.5"])
        .arg("--binary")
        .arg(common::binary())
        .output()
        .expect("run scripts/soak.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        eprintln!("note: {}", stderr.trim());
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SOAK-RESULT "))
        .unwrap_or_else(|| panic!("no SOAK-RESULT line; stdout {stdout}\nstderr {stderr}"));
    let values: HashMap<String, i64> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse::<f64>().ok()? as i64)))
        .collect();
    eprintln!("{}", stderr.trim_end());
    assert!(
        out.status.success(),
        "soak failed: {line}\nstderr (tail): {}",
        stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    Some(values)
}

#[test]
fn short_soak_accounts_for_every_message() {
    timed(170, || {
        let Some(v) = run_soak(2000, 16) else {
            return;
        };
        let get = |k: &str| *v.get(k).unwrap_or_else(|| panic!("{k} missing: {v:?}"));
        assert_eq!(get("sent"), 2000);
        assert_eq!(
            get("upstream") + get("rejected") + get("dropped") + get("tempfailed"),
            get("sent"),
            "{v:?}"
        );
        assert_eq!(get("upstream"), get("accepted"), "{v:?}");
        assert_eq!(get("no_reply"), 0, "{v:?}");
        assert_eq!(get("leftover"), 0, "files left in TempDirectory: {v:?}");
        assert_eq!(get("alive"), 1, "{v:?}");
        // Every outcome happened (the filter chooses each at least 5% of the time).
        for k in ["upstream", "rejected", "dropped", "tempfailed"] {
            assert!(get(k) > 0, "no {k}: {v:?}");
        }
        // Generous: a leak of even a few KiB per message would show over 2,000 messages.
        let (first, last, max) = (
            get("rss_first_kib"),
            get("rss_last_kib"),
            get("rss_max_kib"),
        );
        assert!(
            last < first + 48 * 1024,
            "RSS grew from {first} to {last} KiB"
        );
        assert!(
            max < first + 96 * 1024,
            "RSS peaked at {max} KiB (from {first})"
        );
    });
}
