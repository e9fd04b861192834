//! The README's first command: `proxsmtpd --demo DIR` runs the proxy on an embedded default
//! (a capture server as upstream, a sample filter) that needs no mail server.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{timed, wait_until, Client};

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
    if !(port_free(SMTP) && port_free("127.0.0.1:10026") && port_free(ADMIN)) {
        eprintln!("skipped: the demo's ports 10025/10026/9925 are in use here");
        return;
    }
    timed(30, || {
        let dir = tempfile::tempdir().unwrap();
        let demo = Demo(
            Command::new(env!("CARGO_BIN_EXE_proxsmtpd"))
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
