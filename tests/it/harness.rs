//! Self-tests of the test harness (no proxy involved): the metrics parser, the stuffing
//! helpers, and the scripted upstream driven by the raw client.

use crate::common;

use std::time::Duration;

use crate::common::metrics::{metric, parse};
use crate::common::upstream::Reply;
use crate::common::{normalize_crlf, stuff, timed, unstuff, Client, Upstream};

const EXPOSITION: &str = r#"# HELP proxsmtpd_messages_total Messages by verdict.
# TYPE proxsmtpd_messages_total counter
proxsmtpd_messages_total{verdict="accepted"} 3
proxsmtpd_messages_total{verdict="rejected"} 1
proxsmtpd_build_info{version="0.1.0"} 1
proxsmtpd_connections_active 0
proxsmtpd_filter_duration_seconds_bucket{le="+Inf"} 4
proxsmtpd_odd{a="x,y",b="say \"hi\"\n"} 2.5
"#;

#[test]
fn metrics_parser_and_matcher() {
    let s = parse(EXPOSITION);
    assert_eq!(s.len(), 6);
    assert_eq!(s[0].name, "proxsmtpd_messages_total");
    assert_eq!(
        s[0].labels,
        vec![("verdict".to_string(), "accepted".to_string())]
    );
    assert_eq!(s[0].value, 3.0);
    assert_eq!(s[3].labels, vec![]);
    assert_eq!(s[4].value, 4.0);
    assert_eq!(
        s[5].labels,
        vec![
            ("a".to_string(), "x,y".to_string()),
            ("b".to_string(), "say \"hi\"\n".to_string())
        ]
    );
    let table: &[(common::metrics::Matcher, bool)] = &[
        (
            metric("proxsmtpd_messages_total")
                .label("verdict", "accepted")
                .value(3.0),
            true,
        ),
        (
            metric("proxsmtpd_messages_total")
                .label("verdict", "accepted")
                .value(1.0),
            false,
        ),
        (
            metric("proxsmtpd_messages_total").label("verdict", "dropped"),
            false,
        ),
        (metric("proxsmtpd_messages_total").value(1.0), true),
        (metric("proxsmtpd_connections_active").value(0.0), true),
        (metric("proxsmtpd_connections").value(0.0), false),
        (
            metric("proxsmtpd_odd")
                .label("b", "say \"hi\"\n")
                .value(2.5),
            true,
        ),
    ];
    for (m, want) in table {
        assert_eq!(m.matches(EXPOSITION), *want, "{m:?}");
    }
    assert_eq!(
        metric("proxsmtpd_build_info")
            .label("version", "0.1.0")
            .find_value(EXPOSITION),
        Some(1.0)
    );
}

#[test]
fn stuffing_helpers() {
    let table: &[(&[u8], &[u8])] = &[
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".x\r\n.\r\n..\r\n", b"..x\r\n..\r\n...\r\n.\r\n"),
        (b"x.\r\n", b"x.\r\n.\r\n"),
    ];
    for (content, wire) in table {
        assert_eq!(
            stuff(content),
            *wire,
            "stuff {:?}",
            String::from_utf8_lossy(content)
        );
        let without_marker = &wire[..wire.len() - 3];
        let mut c = content.to_vec();
        if !c.is_empty() && !c.ends_with(b"\r\n") {
            c.extend_from_slice(b"\r\n");
        }
        assert_eq!(unstuff(without_marker), c);
    }
    assert_eq!(
        normalize_crlf(b"a\nb\r\nc\rd\r\r\n"),
        b"a\r\nb\r\nc\r\nd\r\n\r\n"
    );
}

#[test]
fn upstream_and_client_roundtrip() {
    timed(20, || {
        let up = Upstream::builder()
            .banner("220-first\n220 second")
            .reply("RCPT", Reply::text("250-one\n250 two"))
            .reply_with("NOOP", |c| {
                Some(Reply::text(&format!("250 noop #{}", c.nth)))
            })
            .start();
        let mut c = Client::connect(format!("127.0.0.1:{}", up.port()).parse().expect("addr"));
        let g = c.greeting();
        assert_eq!(
            (g.code, g.lines.clone()),
            (220, vec!["first".to_string(), "second".to_string()])
        );
        assert_eq!(
            c.cmd("EHLO x").keywords(),
            vec!["SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "XFORWARD"]
        );
        assert_eq!(c.cmd("NOOP").text(), "noop #1");
        assert_eq!(c.cmd("NOOP").text(), "noop #2");
        assert_eq!(c.cmd("DATA").code, 503, "strict: DATA before MAIL");
        assert_eq!(c.cmd("MAIL FROM:<a@b>").code, 250);
        assert_eq!(c.cmd("MAIL FROM:<a@b>").code, 503, "strict: nested MAIL");
        let r = c.cmd("RCPT TO:<x@y>");
        assert_eq!(r.raw, b"250-one\r\n250 two\r\n");
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(b"Subject: t\r\n\r\n..dot\r\nbare\nlf\r\n.\r\n");
        assert_eq!(c.reply().code, 250);
        assert_eq!(c.cmd("QUIT").code, 221);
        assert!(c.wait_eof(Duration::from_secs(5)));
        let m = up.expect_one();
        assert_eq!(m.raw, b"Subject: t\r\n\r\n..dot\r\nbare\nlf\r\n");
        assert_eq!(m.content, b"Subject: t\r\n\r\n.dot\r\nbare\nlf\r\n");
        assert_eq!(m.rcpts, vec![b"RCPT TO:<x@y>\r\n".to_vec()]);
        assert!(up.wait_closed(0, Duration::from_secs(5)));
        let s = up.session(0);
        assert_eq!(
            s.verbs(),
            ["EHLO", "NOOP", "NOOP", "DATA", "MAIL", "MAIL", "RCPT", "DATA", "QUIT"]
        );
    });
}

#[test]
fn lenient_upstream_ends_data_at_smuggling_sequences() {
    timed(20, || {
        for (wire, content) in [
            (&b"a\n.\nNOOP\r\n"[..], &b"a\n"[..]),
            (b"a\n.\r\nNOOP\r\n", b"a\n"),
            (b"a\r\n.\nNOOP\r\n", b"a\r\n"),
            (b"a\r.\rNOOP\r\n", b"a\r"),
            (b".\r\nNOOP\r\n", b""),
        ] {
            let up = Upstream::builder().lenient_data_end().start();
            let mut c = Client::connect(format!("127.0.0.1:{}", up.port()).parse().expect("addr"));
            c.greeting();
            c.cmd("MAIL FROM:<a@b>");
            c.cmd("RCPT TO:<c@d>");
            assert_eq!(c.cmd("DATA").code, 354);
            c.send(wire);
            assert_eq!(c.reply().code, 250);
            assert_eq!(c.reply().code, 250, "the smuggled NOOP");
            let m = up.expect_one();
            assert_eq!(m.content, content, "{}", common::show(wire));
            assert!(up.wait_command(0, Duration::from_secs(2), |l| l == "NOOP"));
        }
    });
}

#[test]
fn unix_socket_upstream() {
    timed(20, || {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("up.sock");
        let up = Upstream::builder().unix(&path).start();
        assert_eq!(up.out_address(), path.display().to_string());
        let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let mut buf = [0u8; 128];
        let n = std::io::Read::read(&mut s, &mut buf).expect("read");
        assert!(buf[..n].starts_with(b"220 "));
        std::io::Write::write_all(&mut s, b"QUIT\r\n").expect("write");
        assert!(up.wait_closed(0, Duration::from_secs(5)));
    });
}

#[test]
fn watchdog_fails_an_overrunning_test() {
    let r = std::panic::catch_unwind(|| timed(1, || std::thread::sleep(Duration::from_secs(3))));
    assert!(r.is_err());
}
