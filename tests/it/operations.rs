//! Operations: the per-message log line, the User privilege drop, IPv6 literals, and the
//! listen backlog.

use crate::common;

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;

use crate::common::{
    default_message, secs, timed, wait_until, Client, Proxy, ProxyBuilder, Upstream,
};

/// True if some log line holds `<6 upper-case hex digits>: <rest>`.
fn has_summary(log: &str, rest: &str) -> bool {
    log.lines().any(|l| {
        l.match_indices(rest).any(|(i, _)| {
            i >= 8
                && l.is_char_boundary(i - 8)
                && l[i - 8..i - 2]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
                && &l[i - 2..i] == ": "
        })
    })
}

#[test]
fn per_message_log_line() {
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let f = b.script(
            "verdict.sh",
            "f={OUT}/in.$$; cat > $f\ngrep -q REJECTME $f && { rm -f $f; echo '554 5.7.1 Go away spammer' >&2; exit 1; }\ncat $f; rm -f $f\n",
        );
        let p = b.set("FilterCommand", &f).start();
        let mut c = p.open();
        c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>", "<carol@example.net>"],
            &default_message(),
        );
        c.send_mail(&common::message("r", b"REJECTME\r\n"));
        // A filter killed by a signal.
        let p2 = Proxy::with_filter(&up, "cat >/dev/null; kill -9 $$");
        p2.open().send_mail(&default_message());
        let want = [
            (&p, "client=127.0.0.1, from=alice@example.org, to=bob@example.net, to=carol@example.net, status=FILTERED"),
            (&p, "client=127.0.0.1, from=alice@example.org, to=bob@example.net, status=554 5.7.1 Go away spammer"),
            (&p2, "client=127.0.0.1, from=alice@example.org, to=bob@example.net, status=FILTER-ERROR"),
        ];
        for (p, w) in want {
            assert!(
                wait_until(secs(3), || has_summary(&p.log(), w)),
                "no log line `ID: {w}` in:\n{}",
                p.log()
            );
        }
    });
}

/// Makes the proxy's temp dir usable by an unprivileged user.
fn open_up(b: &ProxyBuilder) {
    fs::set_permissions(b.dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
    for d in [b.tmp_dir(), b.out_dir()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o1777)).expect("chmod");
    }
}

fn status_field(pid: i32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default()
}

#[test]
fn user_setting_drops_privileges() {
    timed(30, || {
        if !nix::unistd::geteuid().is_root() {
            skip!("not running as root; User test skipped");
            return;
        }
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        open_up(&b);
        let f = format!("id -u > {}/uid; cat", b.out_dir().display());
        let p = b.set("User", "nobody").set("FilterCommand", &f).start();
        assert_eq!(status_field(p.pid(), "Uid"), "65534 65534 65534 65534");
        assert_eq!(status_field(p.pid(), "Gid"), "65534 65534 65534 65534");
        assert_eq!(p.open().send_mail(&default_message()).code, 250);
        assert_eq!(
            fs::read_to_string(p.out("uid")).unwrap_or_default().trim(),
            "65534",
            "filter uid"
        );
        up.expect_one();
    });
}

#[test]
fn user_setting_drops_supplementary_groups() {
    // deviation from 1.10: the original keeps the supplementary groups of the starting user.
    timed(30, || {
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/usr/bin/setpriv").exists() {
            skip!("needs root and setpriv; test skipped");
            return;
        }
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up).wrapper(&[
            "/usr/bin/setpriv",
            "--groups",
            "4,20",
            "--",
        ]);
        open_up(&b);
        let p = b.set("User", "nobody").start();
        assert!(
            wait_until(secs(3), || status_field(p.pid(), "Uid")
                .starts_with("65534")),
            "uid not switched"
        );
        // Only the target user's own groups may remain (initgroups), none of the starter's.
        let groups = status_field(p.pid(), "Groups");
        assert!(
            groups.split(' ').all(|g| g.is_empty() || g == "65534"),
            "supplementary groups kept: {groups:?}"
        );
    });
}

#[test]
fn ipv6_listen_and_outaddress() {
    // deviation from 1.10: the original has no IPv6 support.
    timed(30, || {
        let up = Upstream::builder().ipv6().start();
        assert!(up.out_address().starts_with("[::1]:"));
        let b = ProxyBuilder::new()
            .upstream(&up)
            .listen_ip(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]));
        let (f, rec) = b.env_recorder();
        let p = b.set("FilterCommand", &f).start();
        let mut c = Client::open(p.addr());
        assert_eq!(c.send_mail(&default_message()).code, 250);
        up.expect_one();
        let run = &rec.wait_runs(1, secs(5))[0];
        assert_eq!(run.var("CLIENT"), Some("::1"));
        assert_eq!(run.var("SERVER"), Some("::1"));
    });
}

#[test]
fn listen_backlog_is_not_a_bottleneck() {
    // deviation from 1.10: the original listens with a backlog of 5.
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new().upstream(&up).start();
        let out = common::command("ss")
            .args(["-ltnH", &format!("sport = :{}", p.port)])
            .output()
            .expect("ss");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // ss -l shows the backlog in the Send-Q column.
        let backlog: u32 = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(backlog >= 128, "listen backlog {backlog}: {text}");
        // And a burst of clients is served.
        let addr = p.addr();
        let clients: Vec<_> = (0..60)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    c.greeting().code
                })
            })
            .collect();
        for t in clients {
            assert_eq!(t.join().expect("client"), 220);
        }
    });
}
