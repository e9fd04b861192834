//! An upstream that speaks out of turn: a reply before the end of the data, two replies to
//! one command, a reply to nothing, garbage, a reply too late. The rule under test: a reply
//! is matched only to the command it answers, and only a reply read after the proxy wrote a
//! message's terminating dot can be that message's verdict. Anything else ends the session
//! with a 4xx to the client; nothing is ever relayed as the answer to another command.

use std::net::SocketAddr;

use crate::common::metrics::metric;
use crate::common::proxy::free_port;
use crate::common::upstream::Reply;
use crate::common::{
    default_message, ms, secs, stuff, timed, Client, Proxy, ProxyBuilder, Upstream,
};

/// The two ways a message goes upstream: streamed (no filter) and spooled (a `cat` filter).
const MODES: [Option<&str>; 2] = [None, Some("cat")];

fn proxy(up: &Upstream, filter: Option<&str>, admin: Option<SocketAddr>) -> Proxy {
    let mut b = ProxyBuilder::new().upstream(up).set("TimeOut", "5");
    if let Some(f) = filter {
        b = b.set("FilterCommand", f);
    }
    if let Some(a) = admin {
        b = b.set("AdminListen", &a.to_string());
    }
    b.start()
}

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// MAIL, RCPT and DATA, each answered as usual.
fn open_transaction(c: &mut Client) {
    assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
}

/// The client got a 4xx for its message and the session ended: no 2xx, nothing later.
fn assert_refused_and_closed(c: &mut Client, what: &str) {
    let r = c.reply();
    assert_eq!(r.code / 100, 4, "{what}: the answer to the dot was {r:?}");
    assert!(c.wait_eof(secs(5)), "{what}: the session went on");
    let all = String::from_utf8_lossy(c.received()).to_string();
    assert!(
        !all.contains("early"),
        "{what}: the early reply was relayed: {all:?}"
    );
}

#[test]
fn a_reply_in_the_same_write_as_354_is_never_the_verdict() {
    timed(60, || {
        for filter in MODES {
            let up = Upstream::builder()
                .reply("DATA", Reply::raw(b"354 go ahead\r\n250 2.0.0 early\r\n"))
                .reply(
                    "DATA_END",
                    Reply::text("554 5.7.1 rejected after the whole body"),
                )
                .start();
            let admin = admin_addr();
            let p = proxy(&up, filter, Some(admin));
            let mut c = p.open();
            open_transaction(&mut c);
            c.send(stuff(&default_message()));
            assert_refused_and_closed(&mut c, &format!("{filter:?}"));
            // The terminating dot never went upstream: nothing can be delivered.
            assert!(up.delivered().is_empty(), "{filter:?}: {:#?}", up.summary());
            assert!(
                up.messages().iter().all(|m| !m.complete),
                "{filter:?}: the end of data went upstream: {:#?}",
                up.summary()
            );
            assert!(up.wait_closed(0, secs(5)), "{filter:?}: upstream left open");
            // Counted as lost upstream and as a temporary failure.
            metric("proxsmtpd_upstream_errors_total")
                .label("stage", "final")
                .value(1.0)
                .assert_in(&admin);
            metric("proxsmtpd_messages_total")
                .label("verdict", "tempfailed")
                .value(1.0)
                .assert_in(&admin);
            assert!(p.log().contains("out of turn"), "{filter:?}: {}", p.log());
            // A new session is in step.
            let mut c = p.open();
            open_transaction(&mut c);
        }
    });
}

#[test]
fn a_reply_while_the_body_is_still_coming_is_never_the_verdict() {
    timed(60, || {
        // Streamed: the upstream has the first half when it says 250.
        let up = Upstream::builder()
            .reply(
                "DATA",
                Reply::text("354 go ahead").and_later(ms(200), b"250 2.0.0 early\r\n"),
            )
            .reply(
                "DATA_END",
                Reply::text("554 5.7.1 rejected after the whole body"),
            )
            .start();
        let p = proxy(&up, None, None);
        let mut c = p.open();
        open_transaction(&mut c);
        let wire = stuff(&default_message());
        let (first, rest) = wire.split_at(40);
        c.send(first);
        std::thread::sleep(ms(700));
        c.send(rest);
        assert_refused_and_closed(&mut c, "streamed");
        assert!(up.delivered().is_empty(), "{:#?}", up.summary());
        assert!(
            up.messages().iter().all(|m| !m.complete),
            "{:#?}",
            up.summary()
        );
    });
}

#[test]
fn an_extra_reply_at_any_stage_ends_the_session_and_is_never_relayed() {
    timed(120, || {
        // (the key the upstream answers twice, the commands the client sends up to and
        // including the one whose reply is doubled)
        let stages: &[(&str, &[&str])] = &[
            ("BANNER", &[]),
            ("EHLO", &["EHLO client.example"]),
            (
                "MAIL",
                &["EHLO client.example", "MAIL FROM:<a@example.org>"],
            ),
            (
                "RCPT",
                &[
                    "EHLO client.example",
                    "MAIL FROM:<a@example.org>",
                    "RCPT TO:<b@example.net>",
                ],
            ),
            ("RSET", &["EHLO client.example", "RSET"]),
            ("NOOP", &["EHLO client.example", "NOOP"]),
            ("VRFY", &["EHLO client.example", "VRFY x"]),
        ];
        for filter in MODES {
            for &(key, commands) in stages {
                let what = format!("{key} {filter:?}");
                let first = if key == "BANNER" {
                    "220 up.test ESMTP"
                } else {
                    "250 2.0.0 first"
                };
                let wire = format!("{first}\r\n250 2.0.0 early extra\r\n");
                let up = Upstream::builder()
                    .reply(key, Reply::raw(wire.as_bytes()))
                    .start();
                let p = proxy(&up, filter, None);
                let mut c = p.connect();
                let g = c.greeting();
                assert_eq!(g.code, 220, "{what}");
                for cmd in commands {
                    let r = c.cmd(cmd);
                    assert!(r.code / 100 == 2, "{what}: {cmd}: {r:?}");
                }
                // Whatever the client says next is answered with 421 and the session ends.
                c.send("NOOP\r\n");
                let r = c.reply();
                assert_eq!(r.code, 421, "{what}: {r:?}");
                assert!(c.wait_eof(secs(5)), "{what}: session went on");
                let all = String::from_utf8_lossy(c.received()).to_string();
                assert!(!all.contains("extra"), "{what}: relayed: {all:?}");
                // The upstream saw nothing after the doubled reply.
                assert!(up.wait_closed(0, secs(5)), "{what}");
                let lines = up.session(0).lines();
                assert_eq!(
                    lines.len(),
                    commands.len(),
                    "{what}: upstream got {lines:?}"
                );
            }
        }
    });
}

#[test]
fn a_second_reply_after_the_verdict_does_not_answer_the_next_command() {
    timed(60, || {
        for filter in MODES {
            let up = Upstream::builder()
                .reply(
                    "DATA_END",
                    Reply::raw(b"250 2.0.0 queued\r\n250 2.0.0 early extra\r\n"),
                )
                .start();
            let p = proxy(&up, filter, None);
            let mut c = p.open();
            // Read after the dot: this one is the verdict, and the message was delivered.
            assert_eq!(c.send_mail(&default_message()).code, 250, "{filter:?}");
            c.send("MAIL FROM:<next@example.org>\r\n");
            assert_eq!(c.reply().code, 421, "{filter:?}");
            assert!(c.wait_eof(secs(5)), "{filter:?}");
            assert_eq!(up.delivered().len(), 1, "{filter:?}");
            assert!(
                !up.session(0).lines().iter().any(|l| l.contains("next@")),
                "{filter:?}: the next MAIL went upstream"
            );
        }
    });
}

#[test]
fn garbage_and_late_replies_are_never_relayed() {
    timed(60, || {
        // Garbage instead of a reply.
        let up = Upstream::builder()
            .reply("MAIL", Reply::raw(b"hello there\r\n"))
            .start();
        let p = proxy(&up, None, None);
        let mut c = p.open();
        let r = c.cmd("MAIL FROM:<a@example.org>");
        assert_eq!(r.code, 421, "{r:?}");
        assert!(c.wait_eof(secs(5)));
        assert!(!String::from_utf8_lossy(c.received()).contains("hello there"));
        drop(p);

        // A reply later than TimeOut: the client gets 421, the late reply goes nowhere.
        let up = Upstream::builder()
            .reply("MAIL", Reply::text("250 2.1.0 late").delay(secs(4)))
            .start();
        let p = Proxy::with_setting(&up, "TimeOut", "2");
        let mut c = p.open();
        c.set_timeout(secs(10));
        let r = c.cmd("MAIL FROM:<a@example.org>");
        assert_eq!(r.code, 421, "{r:?}");
        assert!(c.wait_eof(secs(5)));
        assert!(!String::from_utf8_lossy(c.received()).contains("late"));
    });
}

#[test]
fn pipelined_commands_go_upstream_one_at_a_time() {
    timed(60, || {
        for filter in MODES {
            let up = Upstream::builder()
                .reply("MAIL", Reply::text("250 2.1.0 mail ok").delay(ms(150)))
                .reply("RCPT", Reply::text("250 2.1.5 rcpt ok").delay(ms(100)))
                .start();
            let p = proxy(&up, filter, None);
            let mut c = p.open();
            c.send(
                "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n\
                 RCPT TO:<c@example.net>\r\nNOOP\r\nDATA\r\n",
            );
            let codes: Vec<u16> = (0..5).map(|_| c.reply().code).collect();
            assert_eq!(codes, vec![250, 250, 250, 250, 354], "{filter:?}");
            assert_eq!(c.body(&default_message()).code, 250, "{filter:?}");
            assert_eq!(c.cmd("QUIT").code, 221, "{filter:?}");
            let s = up.session(0);
            assert!(
                s.sent_before_reply.is_empty(),
                "{filter:?}: the proxy sent commands before the reply to: {:?}",
                s.sent_before_reply
            );
            assert_eq!(up.delivered().len(), 1, "{filter:?}");
        }
    });
}
