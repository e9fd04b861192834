//! Security hardening: what reaches a filter from the SMTP session, what can never be run,
//! spool and TempDirectory permissions, the admin listener, metric labels, and the
//! privilege drop. The rules are written down in docs/hardening.md.

use crate::common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::common::metrics::{http_get, parse};
use crate::common::proxy::free_port;
use crate::common::{secs, timed, Client, Proxy, ProxyBuilder, Upstream};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Sends `lines` (each CRLF-terminated here) one by one and reads each reply; the last
/// transaction's DATA is followed by a small body.
fn converse(c: &mut Client, lines: &[&[u8]]) -> Vec<u16> {
    let mut codes = Vec::new();
    for line in lines {
        let mut l = line.to_vec();
        l.extend_from_slice(b"\r\n");
        c.send(&l);
        let r = c.reply();
        codes.push(r.code);
        if r.code == 354 {
            codes.push(c.body(b"Subject: hardening\r\n\r\nbody\r\n").code);
        }
    }
    codes
}

#[test]
fn control_characters_never_reach_the_filter_environment() {
    timed(60, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let (recorder, runs) = b.env_recorder();
        let p = b.set("FilterCommand", &recorder).start();
        let mut c = p.open();
        let codes = converse(
            &mut c,
            &[
                b"XFORWARD ADDR=10.0.0.1 HELO=evil\x1b[2Jhelo\x07.example",
                // A bare CR or a NUL never gets this far (500 5.5.2, see
                // `smuggling.rs`); an OSC title sequence with BEL, DEL, a vertical tab.
                b"MAIL FROM:<ctl\x0bvt\x1b]0;title\x07\x7fdel@hardening.test>",
                b"RCPT TO:<\x1b[31mred\x1b[0m@hardening.test>",
                // C1 control CSI (U+009B, UTF-8 C2 9B) and a TAB.
                b"RCPT TO:<c1\xc2\x9b31m\ttab@hardening.test>",
                // Invalid UTF-8.
                b"RCPT TO:<bad\xff\xfeutf8@hardening.test>",
                b"DATA",
            ],
        );
        assert!(codes.iter().all(|&c| c == 250 || c == 354), "{codes:?}");
        let run = runs.wait_runs(1, secs(10)).remove(0);
        // Every control character but LF (the RECIPIENTS separator) is removed; invalid
        // UTF-8 becomes U+FFFD.
        let want = [
            ("SENDER", "ctlvt]0;titledel@hardening.test"),
            (
                "RECIPIENTS",
                "[31mred[0m@hardening.test\nc131mtab@hardening.test\nbad\u{fffd}\u{fffd}utf8@hardening.test",
            ),
            ("REMOTE", "10.0.0.1"),
            ("REMOTE_HELO", "evil[2Jhelo.example"),
        ];
        for (name, value) in want {
            let got = run.var(name).unwrap_or_else(|| panic!("{name} not set"));
            assert!(
                !got.chars().any(|ch| ch.is_control() && ch != '\n'),
                "{name} carries a control character: {got:?}"
            );
            assert_eq!(got, value, "{name}");
        }
        assert_eq!(up.delivered().len(), 1);
    });
}

#[test]
fn untrusted_values_are_never_run_by_a_shell() {
    timed(60, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let out = b.out_dir();
        let marker = |n: u32| out.join(format!("pwned{n}"));
        // A filter that expands the values the way careless scripts do (unquoted): plain
        // expansion never runs command substitutions found inside a value.
        let script = b.script(
            "careless.sh",
            "echo $SENDER $RECIPIENTS $REMOTE_HELO $CLIENT > /dev/null\nexec cat\n",
        );
        // Through `sh -c` (shell syntax in FilterCommand) as well as run directly.
        for command in [script.clone(), format!("{script} ; true")] {
            let p = ProxyBuilder::new()
                .upstream(&up)
                .set("FilterCommand", &command)
                .set("Header", "X-Checked: %i")
                .start();
            let mut c = Client::connect(p.addr());
            c.greeting();
            let ehlo = format!("EHLO $(touch {})", marker(1).display());
            let helo_fwd = format!("XFORWARD HELO=`touch${{IFS}}{}`", marker(2).display());
            let mail = format!(
                "MAIL FROM:<$(touch {})@hardening.test>",
                marker(3).display()
            );
            let rcpt1 = format!("RCPT TO:<;touch {};@hardening.test>", marker(4).display());
            let rcpt2 = format!("RCPT TO:<`touch {}`@hardening.test>", marker(5).display());
            let rcpt3 = format!("RCPT TO:<x@y|touch {}>", marker(6).display());
            let codes = converse(
                &mut c,
                &[
                    ehlo.as_bytes(),
                    helo_fwd.as_bytes(),
                    mail.as_bytes(),
                    rcpt1.as_bytes(),
                    rcpt2.as_bytes(),
                    rcpt3.as_bytes(),
                    b"DATA",
                ],
            );
            assert_eq!(codes.last(), Some(&250), "{command}: {codes:?}");
            std::thread::sleep(Duration::from_millis(300));
            for n in 1..=6 {
                assert!(
                    !marker(n).exists(),
                    "{command}: an envelope value was executed ({})",
                    marker(n).display()
                );
            }
        }
        assert_eq!(up.delivered().len(), 2);
    });
}

/// The proxy's log after start with TempDirectory at `mode`.
fn start_log_with_temp_mode(mode: u32) -> String {
    let up = Upstream::start();
    let b = ProxyBuilder::new().upstream(&up);
    fs::set_permissions(b.tmp_dir(), fs::Permissions::from_mode(mode)).expect("chmod");
    let p = b.start();
    // The check runs right after the listener is bound and privileges are dropped.
    let mut c = p.open();
    assert_eq!(c.cmd("NOOP").code, 250);
    let log = p.log();
    fs::set_permissions(p.tmp_dir(), fs::Permissions::from_mode(0o700)).expect("chmod");
    log
}

#[test]
fn temp_directory_permissions_are_checked_at_start() {
    timed(60, || {
        let warning = "world-writable without the sticky bit";
        let log = start_log_with_temp_mode(0o777);
        assert!(log.contains(warning), "no warning for 0777: {log}");
        for mode in [0o1777, 0o700, 0o755] {
            let log = start_log_with_temp_mode(mode);
            assert!(!log.contains(warning), "warning for {mode:o}: {log}");
        }
    });
}

#[test]
fn spool_files_are_private_while_the_filter_runs() {
    timed(60, || {
        let up = Upstream::start();
        // File mode: the recorder stats $EMAIL.
        let b = ProxyBuilder::new().upstream(&up).set("FilterType", "file");
        let (recorder, runs) = b.env_recorder();
        let p = b.set("FilterCommand", &recorder).start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&common::default_message()).code, 250);
        let run = runs.wait_runs(1, secs(10)).remove(0);
        assert_eq!(run.email_mode.as_deref(), Some("600"), "$EMAIL mode");
        drop(c);
        drop(p);
        // Pipe mode: stdin is the spooled message, stdout the file the filter writes.
        let b = ProxyBuilder::new().upstream(&up);
        let script = b.script(
            "modes.sh",
            // Measured in a command substitution: a redirection would replace the shell's
            // own descriptor 1 while the command runs.
            "m=$(stat -L -c '%a %U' /proc/$$/fd/0 /proc/$$/fd/1)\necho \"$m\" > {OUT}/modes\nexec cat\n",
        );
        let p = b.set("FilterCommand", &script).start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&common::default_message()).code, 250);
        let modes = fs::read_to_string(p.out("modes")).expect("modes");
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_default();
        assert_eq!(
            modes.lines().collect::<Vec<_>>(),
            vec![format!("600 {me}"), format!("600 {me}")],
            "spool modes (stdin, stdout)"
        );
    });
}

#[test]
fn filter_inherits_only_stdin_stdout_stderr() {
    timed(60, || {
        let up = Upstream::start();
        // The proxy is started with an extra open descriptor, as a careless parent would.
        let p = ProxyBuilder::new()
            .upstream(&up)
            .wrapper(&["/bin/sh", "-c", "exec 7</dev/null; exec \"$@\"", "sh"])
            .set("FilterCommand", "ls -l /proc/self/fd/")
            .start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&common::default_message()).code, 250);
        // The filter's output (the fd listing) is what was delivered.
        let listing = String::from_utf8_lossy(&up.expect_one().content).into_owned();
        let fds: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split(" -> ").next()?.split_whitespace().last())
            .collect();
        let own_dir: Vec<&str> = listing
            .lines()
            .filter(|l| l.ends_with("/fd"))
            .filter_map(|l| l.split(" -> ").next()?.split_whitespace().last())
            .collect();
        let extra: Vec<&&str> = fds
            .iter()
            .filter(|fd| !["0", "1", "2"].contains(fd) && !own_dir.contains(fd))
            .collect();
        assert!(
            extra.is_empty(),
            "the filter inherited {extra:?}:\n{listing}"
        );
    });
}

#[test]
fn admin_listener_is_separate_from_smtp() {
    timed(60, || {
        let up = Upstream::start();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("AdminListen", &admin.to_string())
            .start();
        assert!(
            common::wait_until(secs(5), || http_get(&admin, "/metrics")
                .is_ok_and(|(code, _)| code == 200)),
            "admin /metrics not served"
        );
        // The SMTP port speaks SMTP to an HTTP request, and serves no metrics.
        let mut s = TcpStream::connect(p.addr()).expect("connect smtp");
        s.set_read_timeout(Some(secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        assert!(first.starts_with("220 "), "SMTP port answered {first:?}");
        let mut second = String::new();
        r.read_line(&mut second).unwrap();
        assert!(
            !second.starts_with("HTTP/") && !second.contains("proxsmtpd_"),
            "SMTP port answered HTTP: {second:?}"
        );
        // The admin port neither greets nor accepts SMTP.
        let mut a = TcpStream::connect(admin).expect("connect admin");
        a.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let mut buf = [0u8; 512];
        let greeted = std::io::Read::read(&mut a, &mut buf).unwrap_or(0);
        assert_eq!(greeted, 0, "admin port sent {:?}", &buf[..greeted]);
        a.set_read_timeout(Some(secs(5))).unwrap();
        let _ = a.write_all(b"EHLO client.example\r\nMAIL FROM:<a@b>\r\n");
        let mut reply = Vec::new();
        let _ = std::io::Read::read_to_end(&mut a, &mut reply);
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            !reply.starts_with("220") && !reply.starts_with("250") && !reply.contains("\n250"),
            "admin port speaks SMTP: {reply:?}"
        );
        // (The SMTP port relayed `GET /metrics` upstream as an unknown command: that is SMTP.)
    });
}

/// A TCP connection from a chosen loopback source address.
fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    let [a, b, c, d] = source;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::new(a, b, c, d, 0)).expect("bind source");
    let SocketAddr::V4(v4) = to else {
        panic!("IPv4 only")
    };
    socket::connect(fd.as_raw_fd(), &SockaddrIn::from(v4)).expect("connect");
    TcpStream::from(fd)
}

/// Minimal SMTP over a plain stream: sends each line, returns the last reply line.
fn smtp_lines(stream: TcpStream, lines: &[&str]) -> Vec<String> {
    stream.set_read_timeout(Some(secs(10))).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut read_reply = || {
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return "closed".to_string();
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.trim_end().to_string();
            }
        }
    };
    let mut out = vec![read_reply()];
    for l in lines {
        w.write_all(format!("{l}\r\n").as_bytes()).unwrap();
        out.push(read_reply());
    }
    out
}

#[test]
fn metric_labels_carry_no_personal_data() {
    timed(60, || {
        let up = Upstream::builder()
            .reply_when("RCPT", "refused", "550 5.1.1 unknown user")
            .start();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let b = ProxyBuilder::new()
            .upstream(&up)
            .set("AdminListen", &admin.to_string());
        let script = b.script(
            "pii.sh",
            "case \"$SENDER\" in\n*reject*) echo '554 5.7.1 spam from secret.sender' >&2; exit 1;;\n*drop*) echo '250 dropped' >&2; exit 1;;\nesac\nexec cat\n",
        );
        let p = b.set("FilterCommand", &script).start();
        let private = [
            "carol.private",
            "dave.secret",
            "reject.private",
            "drop.private",
            "refused.private",
            "personal.example",
            "127.0.0.77",
            "Secret-Subject",
            "msgid.secret",
        ];
        for sender in ["carol.private", "reject.private", "drop.private"] {
            let replies = smtp_lines(
                connect_from([127, 0, 0, 77], p.addr()),
                &[
                    "EHLO personal.example",
                    &format!("MAIL FROM:<{sender}@personal.example>"),
                    "RCPT TO:<dave.secret@personal.example>",
                    "RCPT TO:<refused.private@personal.example>",
                    "DATA",
                    "Subject: Secret-Subject\r\nMessage-ID: <msgid.secret@personal.example>\r\n\r\nhi\r\n.",
                    "QUIT",
                ],
            );
            assert_eq!(replies[0].get(..3), Some("220"), "{replies:?}");
        }
        assert!(up.delivered().len() == 1, "{:#?}", up.summary());
        common::metrics::metric("proxsmtpd_messages_total")
            .label("verdict", "dropped")
            .value(1.0)
            .assert_in(&admin);
        let (_, body) = http_get(&admin, "/metrics").expect("metrics");
        for needle in private {
            assert!(
                !body.contains(needle),
                "the metrics contain {needle:?}:\n{body}"
            );
        }
        for sample in parse(&body) {
            for (k, v) in &sample.labels {
                assert!(
                    !v.contains('@') && v.parse::<IpAddr>().is_err(),
                    "{} has label {k}={v:?}",
                    sample.name
                );
            }
        }
    });
}

#[test]
fn runs_as_non_root_when_user_is_set() {
    timed(60, || {
        if !is_root() {
            skip!("not root: the privilege drop cannot be tested; skipped");
            return;
        }
        let nobody = nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .expect("user nobody");
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up).set("User", "nobody");
        fs::set_permissions(b.dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(b.out_dir(), fs::Permissions::from_mode(0o777)).expect("chmod");
        nix::unistd::chown(&b.tmp_dir(), Some(nobody.uid), Some(nobody.gid)).expect("chown");
        let script = b.script(
            "id.sh",
            "id -u > {OUT}/id; id -g >> {OUT}/id; id -G >> {OUT}/id\nexec cat\n",
        );
        let p = b.set("FilterCommand", &script).start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&common::default_message()).code, 250);
        let status = fs::read_to_string(format!("/proc/{}/status", p.pid())).expect("status");
        let field = |name: &str| -> Vec<String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        let uid = nobody.uid.to_string();
        let gid = nobody.gid.to_string();
        assert_eq!(
            field("Uid:"),
            vec![uid.clone(); 4],
            "real/effective/saved/fs uid"
        );
        assert_eq!(
            field("Gid:"),
            vec![gid.clone(); 4],
            "real/effective/saved/fs gid"
        );
        assert!(
            field("Groups:").iter().all(|g| *g == gid),
            "supplementary groups kept: {:?}",
            field("Groups:")
        );
        assert_eq!(field("CapEff:"), vec!["0000000000000000"], "capabilities");
        let ids = fs::read_to_string(p.out("id")).expect("filter ids");
        let ids: Vec<&str> = ids.lines().collect();
        assert_eq!(
            ids,
            vec![uid.as_str(), gid.as_str(), gid.as_str()],
            "filter ids"
        );
    });
}

#[test]
fn control_characters_never_reach_the_log_raw() {
    timed(60, || {
        let up = Upstream::start();
        let p = Proxy::with_filter(&up, "cat");
        let mut c = p.open();
        let codes = converse(
            &mut c,
            &[
                b"MAIL FROM:<a\x0bproxsmtpd: 100999: forged log line\x1b[2J@hardening.test>",
                b"RCPT TO:<\x1b]0;title\x07b@hardening.test>",
                b"DATA",
            ],
        );
        assert_eq!(codes.last(), Some(&250), "{codes:?}");
        assert!(p.wait_log("from=", secs(5)), "no summary line: {}", p.log());
        // Debug tracing (-d 4) shows client lines too; none may carry the raw bytes.
        let log = std::fs::read(&p.log_path).expect("log");
        for (i, line) in log.split(|&b| b == b'\n').enumerate() {
            assert!(
                !line
                    .iter()
                    .any(|&b| b == b'\r' || b == 0x0b || b == 0x1b || b == 0x07),
                "log line {i} carries a control character: {}",
                common::show(line)
            );
        }
    });
}

/// The filter's environment when the daemon itself was started with `vars` set.
fn filter_env_with_daemon_env(vars: &[(&str, &str)]) -> common::proxy::FilterRun {
    let up = Upstream::start();
    let mut b = ProxyBuilder::new().upstream(&up);
    for (k, v) in vars {
        b = b.env(k, v);
    }
    let (recorder, runs) = b.env_recorder();
    let p = b.set("FilterCommand", &recorder).start();
    let mut c = p.open();
    assert_eq!(c.send_mail(&common::default_message()).code, 250);
    runs.wait_runs(1, secs(10)).remove(0)
}

#[test]
fn filter_variables_never_come_from_the_daemon_environment() {
    timed(60, || {
        // A plain-text pipe-mode message without XFORWARD: none of these apply to it.
        let run = filter_env_with_daemon_env(&[
            ("REMOTE", "6.6.6.6"),
            ("REMOTE_HELO", "forged.example"),
            ("EMAIL", "/etc/passwd"),
        ]);
        for name in ["REMOTE", "REMOTE_HELO", "EMAIL"] {
            assert_eq!(run.var(name), None, "{name} inherited from the daemon");
        }
        assert_eq!(run.var("SENDER"), Some("alice@example.org"));
    });
}

#[test]
fn tls_variables_never_come_from_the_daemon_environment() {
    timed(60, || {
        let run = filter_env_with_daemon_env(&[
            ("TLS", "yes"),
            ("TLS_VERSION", "TLSv1.3"),
            ("TLS_CIPHER", "forged"),
        ]);
        for name in ["TLS", "TLS_VERSION", "TLS_CIPHER"] {
            assert_eq!(run.var(name), None, "{name} inherited from the daemon");
        }
    });
}
