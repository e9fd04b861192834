//! The admin server against hostile peers: a flood of idle, half-sent HTTP requests must
//! never take the descriptors SMTP needs, idle admin connections are closed, and the soft
//! RLIMIT_NOFILE is raised to the hard limit at start. The binary runs under `prlimit`.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::metrics::http_get;
use crate::common::proxy::free_port;
use crate::common::{default_message, secs, timed, wait_until, ProxyBuilder, Upstream};

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn have_prlimit() -> bool {
    common::command("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// This test process holds hundreds of sockets itself: its soft limit goes to the hard one.
fn raise_own_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(8192), hard).expect("setrlimit");
}

/// (soft, hard) "Max open files" of `pid`, from /proc/PID/limits.
fn nofile_of(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let cols: Vec<&str> = line.split_whitespace().collect();
    (cols[3].to_string(), cols[4].to_string())
}

/// Opens `n` admin connections that each send an unfinished request head and then wait.
fn half_sent(admin: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match TcpStream::connect_timeout(&admin, Duration::from_millis(500)) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                held.push(s);
            }
            Err(_) => continue,
        }
    }
    held
}

/// 600 idle half-sent admin requests against a process allowed 512 descriptors: SMTP
/// clients are still greeted and their mail delivered, and probes still get answers once
/// the flood's connections time out. (Before the fix the flood took every descriptor and
/// SMTP clients got nothing until it went away.)
#[test]
fn an_admin_flood_does_not_starve_smtp() {
    if !have_prlimit() {
        skip!("prlimit (util-linux) not found; skipping");
        return;
    }
    timed(90, || {
        raise_own_nofile();
        let up = Upstream::start();
        let admin = admin_addr();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("AdminListen", &admin.to_string())
            .wrapper(&["prlimit", "--nofile=512:512", "--"])
            .start();
        assert!(wait_until(secs(5), || http_get(&admin, "/livez")
            .is_ok_and(|r| r.0 == 200)));
        assert_eq!(nofile_of(p.pid()).0, "512");

        let flood = half_sent(admin, 600);
        assert!(
            flood.len() >= 500,
            "only {} connections opened",
            flood.len()
        );
        // Give the proxy time to accept what it will.
        std::thread::sleep(Duration::from_millis(500));

        let started = Instant::now();
        let mut c = common::Client::try_connect(p.addr()).expect("connect to SMTP");
        c.set_timeout(secs(3));
        let greeting = c.try_reply();
        assert!(
            matches!(&greeting, Ok(r) if r.code == 220),
            "no SMTP greeting during the admin flood: {greeting:?}"
        );
        c.set_timeout(secs(10));
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        let r = c.send_mail(&default_message());
        assert_eq!(r.code, 250, "{r:?}");
        assert_eq!(up.expect_one().content, default_message());
        eprintln!(
            "greeted and delivered {:?} into the flood",
            started.elapsed()
        );

        // The flood's connections are closed after the header timeout, so probes get
        // answers again while the flood's sockets are still open on this side.
        assert!(
            wait_until(secs(15), || http_get(&admin, "/readyz")
                .is_ok_and(|r| r.0 == 200)),
            "/readyz never answered during the flood"
        );
        drop(flood);
    });
}

/// Reads from `s` until EOF or error; returns how long that took, or None if the
/// connection was still open after `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Idle admin connections are closed: one that never finishes its request head, one that
/// sends nothing, and a keep-alive connection idle after a complete request. A request
/// with a body is refused.
#[test]
fn idle_admin_connections_are_closed() {
    timed(60, || {
        let up = Upstream::start();
        let admin = admin_addr();
        let _p = ProxyBuilder::new()
            .upstream(&up)
            .set("AdminListen", &admin.to_string())
            .start();
        assert!(wait_until(secs(5), || http_get(&admin, "/livez")
            .is_ok_and(|r| r.0 == 200)));

        let mut half = TcpStream::connect(admin).unwrap();
        half.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let mut silent = TcpStream::connect(admin).unwrap();
        let mut kept = TcpStream::connect(admin).unwrap();
        kept.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // The answer to the complete request arrives; then the connection idles.
        let mut head = [0u8; 12];
        kept.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");

        for (what, s) in [
            ("half-sent request", &mut half),
            ("silent connection", &mut silent),
            ("idle keep-alive connection", &mut kept),
        ] {
            let closed = closed_within(s, secs(15));
            eprintln!("{what}: closed after {closed:?}");
            assert!(
                closed.is_some(),
                "{what}: still open after 15 s (plus the time for the others)"
            );
        }

        let mut body = TcpStream::connect(admin).unwrap();
        body.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nxxxx",
        )
        .unwrap();
        let mut answer = String::new();
        body.set_read_timeout(Some(secs(5))).unwrap();
        let _ = body.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    });
}

/// The soft RLIMIT_NOFILE is raised to the hard limit at start.
#[test]
fn soft_nofile_limit_is_raised_to_the_hard_limit() {
    if !have_prlimit() {
        skip!("prlimit (util-linux) not found; skipping");
        return;
    }
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .wrapper(&["prlimit", "--nofile=256:2048", "--"])
            .start();
        assert_eq!(nofile_of(p.pid()), ("2048".to_string(), "2048".to_string()));
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
    });
}
