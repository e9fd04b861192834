//! Noticing changed configuration and filter scripts on disk.
//!
//! A Kubernetes ConfigMap volume updates by swapping its `..data` symlink, so the files
//! keep their paths but resolve to new inodes. Polling the resolved metadata of each file
//! every few seconds catches that, an in-place edit and a replaced file alike, without an
//! inotify dependency (inotify does not follow the swap of a parent symlink anyway).
//!
//! Everything a reload does on disk or on the network (reading the configuration, the
//! metadata of the watched files, resolving host names in `Listen` and `OutAddress`) runs
//! on the blocking pool through [`off_runtime`]: a hung NFS mount or a slow name server
//! delays the reload, never the sessions served meanwhile.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What identifies one version of a file: which inode, its size and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn version(path: &Path) -> Option<Version> {
    let m = std::fs::metadata(path).ok()?;
    Some(Version {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// Watches a set of files; `changed` says whether any differs from the last look.
#[derive(Debug)]
pub struct Watcher {
    files: Vec<(PathBuf, Option<Version>)>,
}

impl Watcher {
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Self {
        Watcher {
            files: paths
                .into_iter()
                .map(|p| {
                    let v = version(&p);
                    (p, v)
                })
                .collect(),
        }
    }

    pub fn changed(&mut self) -> bool {
        let mut changed = false;
        for (path, last) in &mut self.files {
            let now = version(path);
            if now != *last {
                changed = true;
                *last = now;
            }
        }
        changed
    }
}

impl Watcher {
    /// [`Watcher::new`] off the async workers.
    pub async fn watch(paths: Vec<PathBuf>) -> Self {
        off_runtime(move || Watcher::new(paths)).await
    }

    /// [`Watcher::changed`] off the async workers.
    pub async fn poll(&mut self) -> bool {
        let mut watcher = Watcher {
            files: std::mem::take(&mut self.files),
        };
        let (watcher, changed) = off_runtime(move || {
            let changed = watcher.changed();
            (watcher, changed)
        })
        .await;
        *self = watcher;
        changed
    }
}

/// Runs blocking work (file reads, metadata, name resolution) on the blocking pool and
/// waits for it without holding an async worker. A panic in `work` is resumed here.
pub async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only when the runtime shuts down, which ends this task too.
        Err(_) => std::future::pending().await,
    }
}

/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::check::script_path as filter_script;

    #[test]
    fn filter_script_is_the_first_word_when_it_is_a_path() {
        assert_eq!(
            filter_script("/etc/f.sh --x"),
            Some(PathBuf::from("/etc/f.sh"))
        );
        assert_eq!(filter_script("cat"), None);
        assert_eq!(filter_script(""), None);
    }

    #[test]
    fn notices_a_configmap_style_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("..2026_v1");
        let v2 = dir.path().join("..2026_v2");
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v1.join("filter.sh"), "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::write(v2.join("filter.sh"), "#!/bin/sh\nexit 1\n").unwrap();
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink("..2026_v1", &data).unwrap();
        std::os::unix::fs::symlink("..data/filter.sh", dir.path().join("filter.sh")).unwrap();

        let mut watcher = Watcher::new([dir.path().join("filter.sh")]);
        assert!(!watcher.changed());
        // Kubernetes' atomic update: a new symlink renamed over `..data`.
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink("..2026_v2", &tmp).unwrap();
        std::fs::rename(&tmp, &data).unwrap();
        assert!(watcher.changed());
        assert!(!watcher.changed());
    }

    #[tokio::test]
    async fn polls_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxsmtpd.conf");
        std::fs::write(&path, "OutAddress: 25\n").unwrap();
        let mut watcher = Watcher::watch(vec![path.clone()]).await;
        assert!(!watcher.poll().await);
        std::fs::write(&path, "OutAddress: 2525\n").unwrap();
        assert!(watcher.poll().await);
        assert!(!watcher.poll().await);
        let worker = std::thread::current().id();
        let elsewhere = off_runtime(|| std::thread::current().id()).await;
        assert_ne!(worker, elsewhere);
    }

    #[test]
    fn notices_appearing_and_vanishing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxsmtpd.conf");
        let mut watcher = Watcher::new([path.clone()]);
        std::fs::write(&path, "OutAddress: 25\n").unwrap();
        assert!(watcher.changed());
        std::fs::remove_file(&path).unwrap();
        assert!(watcher.changed());
    }
}
