//! The manual pages committed under `man/` are exactly what `proxsmtpd --man 8|5` prints
//! (generated from the settings list, so a new or changed setting changes them), and every
//! setting is in `proxsmtpd.conf(5)`. Regenerate them with `scripts/man.sh`.

use crate::common;

use std::path::Path;

fn generated(section: &str) -> String {
    let out = common::command(common::binary())
        .args(["--man", section])
        .output()
        .expect("run proxsmtpd --man");
    assert!(out.status.success(), "--man {section}: {:?}", out.status);
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn committed(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("man").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn committed_pages_are_generated() {
    for (section, file) in [("8", "proxsmtpd.8"), ("5", "proxsmtpd.conf.5")] {
        assert!(
            committed(file) == generated(section),
            "man/{file} differs from `proxsmtpd --man {section}`: run scripts/man.sh"
        );
    }
}

#[test]
fn every_setting_is_in_the_conf_page() {
    let page = committed("proxsmtpd.conf.5");
    for s in proxsmtpd::config::names::SETTINGS {
        assert!(
            page.contains(&format!(".B {}\n", s.name)),
            "setting {} missing from man/proxsmtpd.conf.5",
            s.name
        );
    }
}

#[test]
fn unknown_section_is_refused() {
    let out = common::command(common::binary())
        .args(["--man", "3"])
        .output()
        .expect("run proxsmtpd --man");
    assert_eq!(out.status.code(), Some(2));
}
