//! Records the git revision the binary is built from as `BUILD_REVISION`
//! (`proxsmtpd_build_info{revision}`); `unknown` when there is no git or no repository (a
//! source tarball), unless the builder sets `BUILD_REVISION` itself.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=BUILD_REVISION");
    let from_env = std::env::var("BUILD_REVISION")
        .ok()
        .filter(|r| !r.is_empty());
    // Only this package's own repository counts: a source tarball unpacked inside some
    // other repository (a packaging tree) must not report that repository's commit.
    let own_repository = git(&["rev-parse", "--show-toplevel"]).is_some_and(|top| {
        let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        std::fs::canonicalize(top).ok() == std::fs::canonicalize(manifest).ok()
    });
    let revision = from_env
        .or_else(|| {
            own_repository
                .then(|| git(&["rev-parse", "--short=12", "HEAD"]))
                .flatten()
        })
        .unwrap_or_else(|| "unknown".to_string());
    // Rebuilt when HEAD moves: the HEAD file, the branch it names and packed refs.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = std::path::PathBuf::from(dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
            let common = std::path::PathBuf::from(common);
            println!(
                "cargo:rerun-if-changed={}",
                common.join("packed-refs").display()
            );
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                println!("cargo:rerun-if-changed={}", common.join(branch).display());
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=BUILD_REVISION={revision}");
}
