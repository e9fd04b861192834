//! The README's first command: `proxsmtpd --demo DIR` runs the proxy on an embedded default
//! (a capture server as upstream, a sample filter) that needs no mail server.

use crate::common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::common::{timed, wait_until, Client};

/// The demo's ports are fixed: its tests take turns.
static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ports_lock() -> std::sync::MutexGuard<'static, ()> {
    PORTS.lock().unwrap_or_else(|e| e.into_inner())
}

const SMTP: &str = "127.0.0.1:10025";
const ADMIN: &str = "127.0.0.1:9925";

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port_free(addr: &str) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

fn message(body: &str) -> Vec<u8> {
    format!("From: a@example.org\r\nTo: b@example.net\r\nSubject: demo\r\n\r\n{body}\r\n")
        .into_bytes()
}

#[test]
fn demo_accepts_rejects_and_drops_without_a_mail_server() {
    // The demo's addresses are fixed, as the README shows them.
    let _turn = ports_lock();
    if !(port_free(SMTP) && port_free("127.0.0.1:10026") && port_free(ADMIN)) {
        skip!("the demo's ports 10025/10026/9925 are in use here");
        return;
    }
    timed(30, || {
        let dir = tempfile::tempdir().unwrap();
        let demo = Demo(
            common::command(env!("CARGO_BIN_EXE_proxsmtpd"))
                .arg("--demo")
                .arg(dir.path().join("demo"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the demo"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(SMTP).is_ok()),
            "the demo does not listen on {SMTP}"
        );
        let addr: SocketAddr = SMTP.parse().unwrap();

        let mut c = Client::connect(addr);
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        let accepted = c.send_mail(&message("hello"));
        assert_eq!(accepted.code, 250, "{accepted:?}");
        let rejected = c.send_mail(&message("please REJECT this"));
        assert_eq!(rejected.code, 550, "{rejected:?}");
        let dropped = c.send_mail(&message("please DROP this"));
        assert_eq!(dropped.code, 250, "{dropped:?}");
        assert_eq!(c.cmd("QUIT").code, 221);

        // Only the accepted message reached the capture server, tagged by the filter.
        let mail = dir.path().join("demo").join("mail");
        let stored = || std::fs::read_dir(&mail).map(|d| d.count()).unwrap_or(0);
        assert!(wait_until(Duration::from_secs(5), || stored() >= 1));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(stored(), 1, "exactly one message delivered");
        let entry = std::fs::read_dir(&mail).unwrap().next().unwrap().unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        assert!(text.contains("X-Demo-Filter: passed"), "{text}");
        assert!(text.contains("hello"), "{text}");
        drop(demo);
    });
}

/// Starts `--demo` with `args` in `cwd`, stderr to `cwd/demo.stderr`.
fn start_demo(args: &[&str], cwd: &std::path::Path) -> Demo {
    Demo(
        common::command(env!("CARGO_BIN_EXE_proxsmtpd"))
            .args(args)
            .current_dir(cwd)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cwd.join("demo.stderr")).unwrap())
            .spawn()
            .expect("start the demo"),
    )
}

fn demo_ports_free() -> bool {
    port_free(SMTP) && port_free("127.0.0.1:10026") && port_free(ADMIN)
}

/// `--demo` takes `--set` and `-d` like a normal run (they used to become its directory),
/// and its banner shows every verdict word and how to stop it.
#[test]
fn demo_takes_set_and_d_and_explains_itself() {
    let _turn = ports_lock();
    if !demo_ports_free() {
        skip!("the demo's ports 10025/10026/9925 are in use here");
        return;
    }
    timed(30, || {
        let cwd = tempfile::tempdir().unwrap();
        let demo = start_demo(
            &["--demo", "--set", "Header=X-Demo-Set: yes", "-d", "4"],
            cwd.path(),
        );
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(SMTP).is_ok()),
            "the demo does not listen on {SMTP}: {}",
            std::fs::read_to_string(cwd.path().join("demo.stderr")).unwrap_or_default()
        );
        let mut c = Client::connect(SMTP.parse().unwrap());
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        assert_eq!(c.send_mail(&message("hello")).code, 250);
        let deferred = c.send_mail(&message("please TEMPFAIL this"));
        assert_eq!(deferred.code, 451, "{deferred:?}");
        c.cmd("QUIT");

        // The default directory, not one named after an option.
        let entries: Vec<String> = std::fs::read_dir(cwd.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(entries.iter().any(|e| e == "proxsmtpd-demo"), "{entries:?}");
        assert!(
            !entries.iter().any(|e| e.starts_with('-')),
            "an option became a directory: {entries:?}"
        );
        let mail = cwd.path().join("proxsmtpd-demo").join("mail");
        assert!(wait_until(Duration::from_secs(5), || std::fs::read_dir(
            &mail
        )
        .map(|d| d.count())
        .unwrap_or(0)
            >= 1));
        let entry = std::fs::read_dir(&mail).unwrap().next().unwrap().unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        assert!(
            text.contains("X-Demo-Set: yes"),
            "--set not applied:\n{text}"
        );
        assert!(!text.contains("X-Filtered-By"), "{text}");

        let stderr = std::fs::read_to_string(cwd.path().join("demo.stderr")).unwrap();
        for word in ["REJECT", "DROP", "TEMPFAIL", "Ctrl-C"] {
            assert!(stderr.contains(word), "banner without {word}:\n{stderr}");
        }
        // -d 4 logs every relayed line.
        assert!(stderr.contains("CLIENT < EHLO client.example"), "{stderr}");
        drop(demo);
    });
}

/// A second demo while one runs refuses to start, says why, and leaves the running
/// demo's files alone (rewriting them would reload it).
#[test]
fn second_demo_refuses_without_touching_the_first() {
    let _turn = ports_lock();
    if !demo_ports_free() {
        skip!("the demo's ports 10025/10026/9925 are in use here");
        return;
    }
    timed(40, || {
        let cwd = tempfile::tempdir().unwrap();
        let first = start_demo(&["--demo", "shared"], cwd.path());
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(SMTP).is_ok()),
            "the first demo does not listen on {SMTP}: {}",
            std::fs::read_to_string(cwd.path().join("demo.stderr")).unwrap_or_default()
        );
        let dir = cwd.path().join("shared");
        let files = ["proxsmtpd.conf", "demo-filter.sh"];
        // A mark the second demo would overwrite if it prepared the directory.
        for f in files {
            let p = dir.join(f);
            let mut text = std::fs::read_to_string(&p).unwrap();
            text.push_str("# operator's edit\n");
            std::fs::write(&p, text).unwrap();
        }
        let snapshot = |f: &str| {
            let p = dir.join(f);
            (
                std::fs::read_to_string(&p).unwrap(),
                std::fs::metadata(&p).unwrap().modified().unwrap(),
            )
        };
        let before: Vec<_> = files.iter().map(|f| snapshot(f)).collect();

        let second = common::proxy::run_binary(
            std::path::Path::new(env!("CARGO_BIN_EXE_proxsmtpd")),
            &["--demo", dir.to_str().unwrap()],
            Duration::from_secs(10),
        )
        .expect("the second demo kept running");
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert_eq!(second.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("in use"), "{stderr}");
        assert!(stderr.contains("another demo"), "{stderr}");
        let after: Vec<_> = files.iter().map(|f| snapshot(f)).collect();
        assert_eq!(before, after, "the running demo's files were rewritten");

        // The first demo still works.
        let mut c = Client::connect(SMTP.parse().unwrap());
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        assert_eq!(c.send_mail(&message("still here")).code, 250);
        drop(first);
    });
}
