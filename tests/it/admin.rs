//! The admin server against the real binary: `/livez`, `/readyz`, `/healthz` (with
//! `?verbose`) through start, steady state, drain and exit, and the opt-in upstream check.

mod limits;

use crate::common;

use std::fs::{self};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::common::metrics::{http_get, metric};
use crate::common::proxy::{free_port, pid_listens_on};
use crate::common::{
    default_message, ms, secs, timed, wait_until, Client, Daemon, ProxyBuilder, Upstream,
};

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// GET returning (status, body); status 0 when the connection failed.
fn get(admin: &SocketAddr, path: &str) -> (u16, String) {
    http_get(admin, path).unwrap_or((0, String::new()))
}

fn assert_lines(body: &str, lines: &[&str], what: &str) {
    for l in lines {
        assert!(
            body.lines().any(|b| b == *l),
            "{what}: no line {l:?} in {body:?}"
        );
    }
}

/// Start: never ready before the SMTP listener is bound. Steady state: every probe 200.
/// Drain: readiness 503 as soon as SIGTERM arrives while a message is still in its
/// transaction, liveness 200 until the process is gone; the message is still delivered and
/// the process exits 0.
#[test]
fn probes_follow_start_steady_state_drain_and_exit() {
    timed(40, || {
        let up = Upstream::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        let filter = dir.path().join("slow.sh");
        fs::write(
            &filter,
            format!(
                "#!/bin/sh\n: > {o}/started\nsleep 2\ncat\n: > {o}/finished\n",
                o = out.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&filter, fs::Permissions::from_mode(0o755)).unwrap();
        let admin = admin_addr();
        let port = free_port();
        let conf = dir.path().join("proxsmtpd.conf");
        fs::write(
            &conf,
            format!(
                "Listen: 127.0.0.1:{port}\nOutAddress: {}\nAdminListen: {admin}\nTempDirectory: {}\n\
                 FilterCommand: {}\nDrainTimeout: 15\nTimeOut: 20\n",
                up.out_address(),
                dir.path().join("tmp").display(),
                filter.display()
            ),
        )
        .unwrap();
        let mut d = Daemon::spawn(&["-d", "3", "-f", conf.to_str().unwrap()], &[], dir.path());

        // Start: poll as fast as possible; the first 200 must find the listener bound.
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            let (status, _) = get(&admin, "/readyz");
            if status == 200 {
                assert!(
                    pid_listens_on(d.pid, port),
                    "/readyz said 200 before the SMTP listener was bound"
                );
                break;
            }
            if status != 0 {
                seen.push(status);
            }
            assert!(d.exit_status().is_none(), "proxsmtpd exited at start");
            assert!(
                started.elapsed() < secs(10),
                "never ready; answers: {seen:?}"
            );
            std::thread::sleep(ms(5));
        }
        assert!(
            seen.iter().all(|s| *s == 503),
            "before ready, /readyz must answer 503: {seen:?}"
        );

        // Steady state.
        assert_eq!(get(&admin, "/livez"), (200, "ok\n".to_string()));
        assert_eq!(get(&admin, "/readyz"), (200, "ok\n".to_string()));
        assert_eq!(get(&admin, "/healthz"), (200, "ok\n".to_string()));
        let (s, body) = get(&admin, "/readyz?verbose");
        assert_eq!(s, 200, "{body}");
        assert_lines(
            &body,
            &[
                "[+]listener ok",
                "[+]config ok",
                "[+]draining ok",
                "readyz check passed",
            ],
            "/readyz?verbose",
        );
        let (s, body) = get(&admin, "/healthz?verbose");
        assert_eq!(s, 200, "{body}");
        assert_lines(
            &body,
            &["[+]draining ok", "healthz check passed"],
            "/healthz?verbose",
        );
        let (s, body) = get(&admin, "/livez?verbose");
        assert_eq!(s, 200);
        assert_lines(
            &body,
            &["[+]ping ok", "livez check passed"],
            "/livez?verbose",
        );
        assert_eq!(get(&admin, "/no-such-page").0, 404);
        metric("proxsmtpd_draining").value(0.0).assert_in(&admin);

        // A message whose filter is still running when SIGTERM arrives.
        let mut c = Client::open(SocketAddr::from(([127, 0, 0, 1], port)));
        c.set_timeout(secs(15));
        assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(common::stuff(&default_message()));
        assert!(
            wait_until(secs(5), || out.join("started").exists()),
            "the filter never started"
        );
        d.signal(Signal::SIGTERM);
        let term_at = Instant::now();
        assert!(
            wait_until(secs(1), || get(&admin, "/readyz").0 == 503),
            "/readyz still not 503 one second after SIGTERM"
        );
        assert!(
            !out.join("finished").exists(),
            "the filter finished before readiness turned 503 (test too slow to show the order)"
        );
        let (s, body) = get(&admin, "/readyz");
        assert_eq!(s, 503);
        assert_lines(
            &body,
            &["[-]draining failed", "readyz check failed"],
            "/readyz draining",
        );
        let (s, body) = get(&admin, "/readyz?verbose");
        assert_eq!(s, 503);
        assert_lines(
            &body,
            &[
                "[+]listener ok",
                "[+]config ok",
                "[-]draining failed",
                "readyz check failed",
            ],
            "/readyz?verbose draining",
        );
        assert_eq!(get(&admin, "/healthz").0, 503);
        assert_eq!(get(&admin, "/livez"), (200, "ok\n".to_string()));
        metric("proxsmtpd_draining").value(1.0).assert_in(&admin);
        eprintln!("readiness turned 503 {:?} after SIGTERM", term_at.elapsed());

        // The message in flight is delivered, then the idle session is told to go.
        let r = c.reply();
        assert_eq!(r.code, 250, "final reply of the message in flight: {r:?}");
        let bye = c.reply();
        assert_eq!(bye.code, 421, "{bye:?}");
        assert!(bye.text().starts_with("4.3.2"), "{bye:?}");
        assert_eq!(up.expect_one().content, default_message());

        // Liveness stays 200 until the process is gone.
        let mut last_ok = Instant::now();
        loop {
            match get(&admin, "/livez") {
                (200, _) => last_ok = Instant::now(),
                (0, _) => break,
                (s, b) => panic!("/livez answered {s} {b:?} while draining"),
            }
            assert!(term_at.elapsed() < secs(20), "proxsmtpd did not exit");
            std::thread::sleep(ms(20));
        }
        let status = d.wait_exit(secs(3)).unwrap_or_else(|| {
            panic!(
                "the admin server stopped answering {:?} ago but the process is still running",
                last_ok.elapsed()
            )
        });
        assert_eq!(status.code(), Some(0), "exit status {status:?}");
    });
}

/// `ReadinessCheckUpstream` is opt-in: an unreachable upstream fails readiness only when
/// the operator asks for the check.
#[test]
fn upstream_readiness_check_is_opt_in() {
    timed(30, || {
        let up = Upstream::start();
        let closed = format!("127.0.0.1:{}", free_port());

        let a1 = admin_addr();
        let _p1 = ProxyBuilder::new()
            .upstream(&up)
            .set("AdminListen", &a1.to_string())
            .set("ReadinessCheckUpstream", "on")
            .start();
        let a2 = admin_addr();
        let _p2 = ProxyBuilder::new()
            .set("OutAddress", &closed)
            .set("AdminListen", &a2.to_string())
            .set("ReadinessCheckUpstream", "on")
            .start();
        let a3 = admin_addr();
        let _p3 = ProxyBuilder::new()
            .set("OutAddress", &closed)
            .set("AdminListen", &a3.to_string())
            .start();

        assert!(wait_until(secs(5), || get(&a1, "/readyz").0 == 200));
        let (s, body) = get(&a1, "/readyz?verbose");
        assert_eq!(s, 200, "{body}");
        assert_lines(&body, &["[+]upstream ok"], "check on, upstream up");

        assert!(wait_until(secs(5), || get(&a2, "/livez").0 == 200));
        let (s, body) = get(&a2, "/readyz");
        assert_eq!(s, 503, "check on, upstream down: {body}");
        assert_lines(&body, &["[-]upstream failed"], "check on, upstream down");
        assert_eq!(
            get(&a2, "/livez").0,
            200,
            "liveness never depends on the upstream"
        );

        assert!(wait_until(secs(5), || get(&a3, "/livez").0 == 200));
        let (s, body) = get(&a3, "/readyz?verbose");
        assert_eq!(s, 200, "check off, upstream down: {body}");
        assert!(!body.contains("upstream"), "{body}");
    });
}

/// `PROXSMTPD_ADMIN_LISTEN` alone starts the admin server, on its own port.
#[test]
fn admin_listen_from_the_environment() {
    timed(20, || {
        let up = Upstream::start();
        let admin = admin_addr();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .env("PROXSMTPD_ADMIN_LISTEN", &admin.to_string())
            .start();
        assert!(wait_until(secs(5), || get(&admin, "/livez").0 == 200));
        assert_eq!(get(&admin, "/readyz").0, 200);
        assert_ne!(admin.port(), p.port);
        // The SMTP port speaks SMTP, not HTTP.
        let mut c = p.connect();
        assert_eq!(c.greeting().code, 220);
    });
}

/// `/readyz` is 503 with `[-]filter failed` while FilterCommand names a program that does
/// not exist or cannot be executed, in every form the example filters use; a command that
/// can run, or shell syntax that cannot be analysed, is ready.
#[test]
fn readiness_fails_when_the_filter_cannot_run() {
    timed(60, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new();
        let good = b.script("good.sh", "cat\n");
        let plain = b.dir().join("plain.sh");
        fs::write(&plain, "cat\n").unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
        let missing = b.dir().join("missing.sh").display().to_string();
        let plain = plain.display().to_string();
        // (FilterCommand, ready)
        let cases: Vec<(String, bool)> = vec![
            (good.clone(), true),
            (format!("SPAM_LIMIT=5 {good} --tag"), true),
            (format!("sh -c '{good}'"), true),
            ("cat".into(), true),
            (format!("echo run >> /dev/null; {missing}"), true),
            (missing.clone(), false),
            (format!("SPAM_LIMIT=5 {missing}"), false),
            (format!("sh -c 'exec {missing} --x'"), false),
            (format!("/bin/sh -c \"{missing}\""), false),
            (plain.clone(), false),
            ("no-such-filter-program --x".into(), false),
        ];
        for (command, ready) in cases {
            let admin = admin_addr();
            let _p = ProxyBuilder::new()
                .upstream(&up)
                .set("AdminListen", &admin.to_string())
                .set("FilterCommand", &command)
                .start();
            assert!(wait_until(secs(5), || get(&admin, "/livez").0 == 200));
            let (status, body) = get(&admin, "/readyz?verbose");
            if ready {
                assert_eq!(status, 200, "{command}: {body}");
                assert_lines(&body, &["[+]filter ok"], &command);
            } else {
                assert_eq!(status, 503, "{command}: {body}");
                assert_lines(
                    &body,
                    &["[+]listener ok", "[-]filter failed", "readyz check failed"],
                    &command,
                );
                let (status, body) = get(&admin, "/readyz");
                assert_eq!(status, 503);
                assert_lines(&body, &["[-]filter failed"], &command);
            }
        }
    });
}

/// The filter check follows reloads: a configuration naming a missing script turns
/// readiness 503, the next one naming a runnable script turns it back to 200.
#[test]
fn filter_readiness_is_rechecked_on_reload() {
    timed(40, || {
        let up = Upstream::start();
        let admin = admin_addr();
        let b = ProxyBuilder::new()
            .upstream(&up)
            .set("AdminListen", &admin.to_string())
            .set("ReloadWatch", "off");
        let good = b.script("good.sh", "cat\n");
        let p = b.set("FilterCommand", &good).start();
        assert!(wait_until(secs(5), || get(&admin, "/readyz").0 == 200));
        let conf = fs::read_to_string(&p.conf_path).unwrap();
        let missing = p.dir().join("gone.sh").display().to_string();
        fs::write(
            &p.conf_path,
            conf.replace(
                &format!("FilterCommand: {good}"),
                &format!("FilterCommand: X=1 {missing}"),
            ),
        )
        .unwrap();
        p.signal(Signal::SIGHUP);
        assert!(
            wait_until(secs(5), || get(&admin, "/readyz").0 == 503),
            "still ready with a missing filter after the reload"
        );
        assert_lines(
            &get(&admin, "/readyz").1,
            &["[-]filter failed"],
            "after reload",
        );
        assert!(p.wait_log("gone.sh", secs(3)), "the reason is not logged");
        fs::write(&p.conf_path, &conf).unwrap();
        p.signal(Signal::SIGHUP);
        assert!(
            wait_until(secs(5), || get(&admin, "/readyz").0 == 200),
            "not ready again after reloading a runnable filter"
        );
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
    });
}
