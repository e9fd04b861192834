//! Reloading the real binary's configuration: SIGHUP, a broken new configuration, and a
//! Kubernetes ConfigMap update (an atomic `..data` symlink swap) of the config file and the
//! filter script, all while a client session stays open.

use std::fs::{self};
use std::net::SocketAddr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use crate::common::metrics::{http_get, metric};
use crate::common::proxy::{free_port, pid_listens_on};
use crate::common::{
    message, secs, timed, wait_until, Client, Daemon, Proxy, ProxyBuilder, Upstream,
};

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A filter script that marks each message with `X-Filter: <tag>`.
fn tagging_filter(tag: &str) -> String {
    format!("#!/bin/sh\nprintf 'X-Filter: {tag}\\r\\n'\ncat\n")
}

/// Replaces the file at `path` the way an editor or a config tool does: a new file
/// renamed over the old one.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, path).expect("rename");
}

/// The value of a header line in the message, or "<none>".
fn header(content: &[u8], name: &str) -> String {
    String::from_utf8_lossy(content)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
        .unwrap_or_else(|| "<none>".into())
}

fn send(c: &mut Client, subject: &str) {
    let r = c.send_mail(&message(subject, b"body\r\n"));
    assert_eq!(r.code, 250, "{subject}: {r:?}");
}

fn reloads(admin: &SocketAddr, result: &str, n: f64) {
    metric("proxsmtpd_config_reloads_total")
        .label("result", result)
        .value(n)
        .timeout(secs(8))
        .assert_in(admin);
}

/// A proxy whose FilterCommand is filter-a.sh, with filter-b.sh ready; file watching off
/// so that only SIGHUP reloads.
fn sighup_proxy(up: &Upstream) -> (Proxy, SocketAddr, String, String) {
    let admin = admin_addr();
    let b = ProxyBuilder::new()
        .upstream(up)
        .set("AdminListen", &admin.to_string())
        .set("ReloadWatch", "off");
    let a = b.script("filter-a.sh", &tagging_filter("A"));
    let bb = b.script("filter-b.sh", &tagging_filter("B"));
    let p = b.set("FilterCommand", &a).start();
    assert!(wait_until(secs(5), || http_get(&admin, "/livez").is_ok()));
    (p, admin, a, bb)
}

#[test]
fn sighup_applies_a_new_filter_to_the_next_message_of_an_open_session() {
    timed(30, || {
        let up = Upstream::start();
        let (p, admin, a, b) = sighup_proxy(&up);
        let mut c = p.open();
        send(&mut c, "one");
        let conf = fs::read_to_string(&p.conf_path).unwrap();
        replace_file(&p.conf_path, &conf.replace(&a, &b));
        p.signal(Signal::SIGHUP);
        reloads(&admin, "success", 1.0);
        assert!(p.wait_log("configuration reloaded", secs(3)));
        send(&mut c, "two");
        let d = up.wait_delivered(2, secs(5));
        assert_eq!(header(&d[0].content, "X-Filter"), "A");
        assert_eq!(
            header(&d[1].content, "X-Filter"),
            "B",
            "the reloaded filter"
        );
        assert_eq!(up.session_count(), 1, "the session was not dropped");
        assert_eq!(c.cmd("NOOP").code, 250);
        reloads(&admin, "failure", 0.0);
    });
}

#[test]
fn broken_new_config_is_refused_and_the_running_one_stays() {
    timed(30, || {
        let up = Upstream::start();
        let (p, admin, a, b) = sighup_proxy(&up);
        let mut c = p.open();
        send(&mut c, "one");
        let good = fs::read_to_string(&p.conf_path).unwrap().replace(&a, &b);
        let line = good.lines().count() + 1;
        replace_file(&p.conf_path, &format!("{good}TimeOut: soon\n"));
        p.signal(Signal::SIGHUP);
        reloads(&admin, "failure", 1.0);
        let conf = p.conf_path.display().to_string();
        let log_line = p
            .log()
            .lines()
            .find(|l| l.contains("refused"))
            .map(str::to_string)
            .unwrap_or_default();
        assert!(
            log_line.contains(&format!("{conf}:{line}")) && log_line.contains("TimeOut"),
            "the refusal must name the file, line and setting: {log_line:?}"
        );
        send(&mut c, "two");
        reloads(&admin, "success", 0.0);
        // The proxy still takes new clients, with the old configuration.
        let mut c2 = p.open();
        send(&mut c2, "three");
        // Fixed, it is taken.
        replace_file(&p.conf_path, &good);
        p.signal(Signal::SIGHUP);
        reloads(&admin, "success", 1.0);
        send(&mut c, "four");
        let d = up.wait_delivered(4, secs(5));
        let mut tags: Vec<(String, String)> = d
            .iter()
            .map(|m| {
                (
                    header(&m.content, "Subject"),
                    header(&m.content, "X-Filter"),
                )
            })
            .collect();
        tags.sort();
        let want: Vec<(String, String)> =
            [("four", "B"), ("one", "A"), ("three", "A"), ("two", "A")]
                .iter()
                .map(|(s, t)| (s.to_string(), t.to_string()))
                .collect();
        assert_eq!(tags, want, "(Subject, X-Filter) of each message");
    });
}

/// A ConfigMap volume as the kubelet lays it out: a timestamped directory per version,
/// `..data` pointing at the current one, and each key a symlink through `..data`.
struct ConfigMap {
    dir: PathBuf,
    current: Option<PathBuf>,
    versions: usize,
}

impl ConfigMap {
    fn new(dir: PathBuf, files: &[(&str, &str)]) -> ConfigMap {
        fs::create_dir_all(&dir).unwrap();
        let mut cm = ConfigMap {
            dir,
            current: None,
            versions: 0,
        };
        cm.update(files);
        for (name, _) in files {
            symlink(format!("..data/{name}"), cm.dir.join(name)).unwrap();
        }
        cm
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes a new version directory, swaps `..data` to it with one rename, and removes
    /// the old version, as the kubelet's atomic writer does.
    fn update(&mut self, files: &[(&str, &str)]) {
        self.versions += 1;
        let name = format!(
            "..2026_01_01_00_00_{:02}.{:09}",
            self.versions, self.versions
        );
        let version = self.dir.join(&name);
        fs::create_dir(&version).unwrap();
        for (file, text) in files {
            let p = version.join(file);
            fs::write(&p, text).unwrap();
            let mode = if text.starts_with("#!") { 0o755 } else { 0o644 };
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&name, &tmp).unwrap();
        fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(version) {
            fs::remove_dir_all(old).unwrap();
        }
    }
}

#[test]
fn configmap_symlink_swap_of_filter_and_config_while_a_session_stays_open() {
    timed(40, || {
        let up = Upstream::start();
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let port = free_port();
        let admin = admin_addr();
        let cm_dir = dir.path().join("config");
        let conf = |tag: &str| {
            format!(
                "Listen: 127.0.0.1:{port}\nOutAddress: {}\nAdminListen: {admin}\n\
                 TempDirectory: {}\nFilterCommand: {}\nHeader: X-Config: {tag}\n",
                up.out_address(),
                tmp.display(),
                cm_dir.join("filter.sh").display()
            )
        };
        let mut cm = ConfigMap::new(
            cm_dir.clone(),
            &[
                ("proxsmtpd.conf", &conf("v1")),
                ("filter.sh", &tagging_filter("v1")),
            ],
        );
        let conf_path = cm.path("proxsmtpd.conf");
        let d = Daemon::spawn(
            &["-d", "3", "-f", conf_path.to_str().unwrap()],
            &[],
            dir.path(),
        );
        assert!(
            wait_until(secs(10), || pid_listens_on(d.pid, port)),
            "proxsmtpd did not start"
        );
        assert!(wait_until(secs(5), || http_get(&admin, "/livez").is_ok()));

        let mut c = Client::open(SocketAddr::from(([127, 0, 0, 1], port)));
        send(&mut c, "one");

        // A new filter script only.
        cm.update(&[
            ("proxsmtpd.conf", &conf("v1")),
            ("filter.sh", &tagging_filter("v2")),
        ]);
        reloads(&admin, "success", 1.0);
        send(&mut c, "two");

        // A new configuration (the filter is the same text, in a new version directory).
        cm.update(&[
            ("proxsmtpd.conf", &conf("v3")),
            ("filter.sh", &tagging_filter("v2")),
        ]);
        reloads(&admin, "success", 2.0);
        send(&mut c, "three");

        let delivered = up.wait_delivered(3, secs(5));
        let seen: Vec<(String, String)> = delivered
            .iter()
            .map(|m| {
                (
                    header(&m.content, "X-Config"),
                    header(&m.content, "X-Filter"),
                )
            })
            .collect();
        let want: Vec<(String, String)> = [("v1", "v1"), ("v1", "v2"), ("v3", "v2")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(seen, want, "(X-Config, X-Filter) of each message");
        assert_eq!(up.session_count(), 1, "the session was not dropped");
        assert_eq!(c.cmd("NOOP").code, 250);
        assert!(d.log().contains("configuration or filter changed on disk"));
        reloads(&admin, "failure", 0.0);
    });
}
