//! What the client sees when the upstream is down, refuses, disconnects, is slow, or answers
//! with multi-line replies at any stage.

use std::time::Instant;

use crate::common::proxy::free_port;
use crate::common::upstream::Reply;
use crate::common::{default_message, ms, secs, timed, Proxy, ProxyBuilder, Upstream};

#[test]
fn upstream_unreachable_gives_421_then_close() {
    // deviation from 1.10: the original closes the client connection without any reply.
    timed(30, || {
        let mut p = ProxyBuilder::new()
            .set("OutAddress", &format!("127.0.0.1:{}", free_port()))
            .start();
        for _ in 0..2 {
            let mut c = p.connect();
            c.set_timeout(secs(8));
            let g = c.try_reply().unwrap_or_else(|e| panic!("no reply: {e}"));
            assert_eq!(g.code, 421, "{g:?}");
            assert!(c.wait_eof(secs(5)), "connection not closed after 421");
        }
        assert!(p.alive(), "the proxy exited");
    });
}

#[test]
fn upstream_421_greeting_relayed() {
    timed(30, || {
        let up = Upstream::builder()
            .banner_reply(Reply::text("421 4.3.2 upstream.test service not available").then_close())
            .start();
        let p = ProxyBuilder::new().upstream(&up).start();
        let mut c = p.connect();
        assert_eq!(
            c.greeting().raw_str(),
            "421 4.3.2 upstream.test service not available\r\n"
        );
        assert!(
            c.wait_eof(secs(5)),
            "connection not closed after the upstream's 421"
        );
    });
}

fn final_reply_with(up: &Upstream, filter: Option<&str>) -> String {
    let mut b = ProxyBuilder::new().upstream(up);
    if let Some(f) = filter {
        b = b.set("FilterCommand", f);
    }
    let p = b.start();
    let mut c = p.open();
    let r = c.send_mail(&default_message()).raw_str();
    p.assert_tmp_clean();
    r
}

#[test]
fn upstream_rejection_at_end_of_data_reaches_client() {
    timed(30, || {
        for filter in [None, Some("cat")] {
            let up = Upstream::builder()
                .reply(
                    "DATA_END",
                    Reply::text("554 5.7.1 Message content rejected by upstream"),
                )
                .start();
            assert_eq!(
                final_reply_with(&up, filter),
                "554 5.7.1 Message content rejected by upstream\r\n",
                "{filter:?}"
            );
            let up = Upstream::builder()
                .reply(
                    "DATA_END",
                    Reply::text("452 4.3.1 Insufficient system storage"),
                )
                .start();
            assert_eq!(
                final_reply_with(&up, filter),
                "452 4.3.1 Insufficient system storage\r\n",
                "{filter:?}"
            );
        }
    });
}

#[test]
fn upstream_refusing_data_command_reaches_client() {
    timed(30, || {
        let up = Upstream::builder()
            .reply("DATA", Reply::text("451 4.3.0 DATA refused by upstream"))
            .start();
        let p = Proxy::with_filter(&up, "cat");
        let mut c = p.open();
        c.cmd("MAIL FROM:<alice@example.org>");
        c.cmd("RCPT TO:<bob@example.net>");
        let mut r = c.cmd("DATA");
        if r.code == 354 {
            r = c.body(&default_message());
        }
        assert_eq!(r.raw_str(), "451 4.3.0 DATA refused by upstream\r\n");
        assert!(up.messages().is_empty());
        p.assert_tmp_clean();
        assert_eq!(c.cmd("NOOP").code, 250, "connection unusable afterwards");
    });
}

#[test]
fn upstream_rejecting_recipient_is_relayed_and_nothing_delivered() {
    timed(30, || {
        let rej = "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown";
        let up = Upstream::builder().reply("RCPT", Reply::text(rej)).start();
        let p = Proxy::with_filter(&up, "cat");
        let mut c = p.open();
        assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
        assert_eq!(
            c.cmd("RCPT TO:<nobody@example.net>").raw_str(),
            format!("{rej}\r\n")
        );
        let mut r = c.cmd("DATA");
        if r.code == 354 {
            r = c.body(&default_message());
        }
        assert!(
            r.code >= 500,
            "message without accepted recipients got {r:?}"
        );
        assert!(up.messages().is_empty());
    });
}

#[test]
fn upstream_disconnect_before_final_reply_is_never_250() {
    timed(30, || {
        for filter in [None, Some("cat")] {
            let up = Upstream::builder()
                .reply("DATA_END", Reply::close())
                .start();
            let p = ProxyBuilder::new().upstream(&up);
            let p = match filter {
                Some(f) => p.set("FilterCommand", f),
                None => p,
            }
            .start();
            let mut c = p.open();
            let r = c.send_mail(&default_message());
            assert!((400..500).contains(&r.code), "filter {filter:?}: {r:?}");
            p.assert_tmp_clean();
        }
    });
}

#[test]
fn upstream_disconnect_at_data_command_is_never_250() {
    timed(30, || {
        for filter in [None, Some("cat")] {
            let up = Upstream::builder().reply("DATA", Reply::close()).start();
            let p = ProxyBuilder::new().upstream(&up);
            let p = match filter {
                Some(f) => p.set("FilterCommand", f),
                None => p,
            }
            .start();
            let mut c = p.open();
            c.cmd("MAIL FROM:<alice@example.org>");
            c.cmd("RCPT TO:<bob@example.net>");
            let mut r = c.cmd("DATA");
            if r.code == 354 {
                r = c.body(&default_message());
            }
            assert!((400..500).contains(&r.code), "filter {filter:?}: {r:?}");
        }
    });
}

#[test]
fn unfiltered_body_is_streamed_before_its_end() {
    // Without a filter nothing needs the whole message first: the upstream gets DATA at
    // once and the body as it arrives. (The original spools it and sends DATA after the dot.)
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new().upstream(&up).start();
        let mut c = p.open();
        c.begin_data();
        c.send(b"Subject: streamed\r\n\r\nthe first half\r\n");
        let streaming = up.wait(secs(5), |s| {
            s.sessions
                .first()
                .is_some_and(|x| x.verbs().iter().any(|v| v == "DATA"))
        });
        assert!(
            streaming,
            "no DATA upstream before the end: {:#?}",
            up.summary()
        );
        c.assert_silent(ms(200));
        c.send(b"..and the second\r\n.\r\n");
        let r = c.reply();
        assert_eq!(r.code, 250, "{r:?}");
        assert_eq!(
            up.expect_one().content,
            b"Subject: streamed\r\n\r\nthe first half\r\n.and the second\r\n".to_vec()
        );
    });
}

#[test]
fn upstream_silent_after_data_is_never_250() {
    timed(30, || {
        let up = Upstream::builder()
            .reply("DATA_END", Reply::silent())
            .start();
        let p = Proxy::with_setting(&up, "TimeOut", "2");
        let mut c = p.open();
        c.set_timeout(secs(8));
        let t0 = Instant::now();
        let r = c.send_mail(&default_message());
        assert!((400..500).contains(&r.code), "{r:?}");
        assert!(
            t0.elapsed() >= ms(1500),
            "answered before TimeOut: {:?}",
            t0.elapsed()
        );
    });
}

#[test]
fn slow_upstream_within_timeout_works() {
    timed(30, || {
        let up = Upstream::builder()
            .banner_reply(Reply::text("220 upstream.test slow ESMTP").delay(ms(1000)))
            .reply("RCPT", Reply::text("250 2.1.5 slow ok").delay(ms(1500)))
            .reply(
                "DATA_END",
                Reply::text("250 2.0.0 slow queued").delay(ms(1500)),
            )
            .start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("FilterCommand", "cat")
            .set("TimeOut", "10")
            .start();
        let mut c = p.open();
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &default_message(),
        );
        assert_eq!(t.rcpts[0].raw_str(), "250 2.1.5 slow ok\r\n");
        assert_eq!(t.final_reply.raw_str(), "250 2.0.0 slow queued\r\n");
        assert_bytes_eq!(up.expect_one().content, default_message());
    });
}

#[test]
fn multiline_envelope_replies_relayed_whole() {
    timed(30, || {
        let up = Upstream::builder()
            .reply(
                "MAIL",
                Reply::text("250-2.1.0 sender first line\n250 2.1.0 Ok"),
            )
            .reply(
                "RCPT",
                Reply::text("250-2.1.5 rcpt first line\n250-2.1.5 middle\n250 2.1.5 Ok"),
            )
            .start();
        let p = Proxy::with_filter(&up, "cat");
        let mut c = p.open();
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &default_message(),
        );
        assert_eq!(
            t.mail.raw_str(),
            "250-2.1.0 sender first line\r\n250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            t.rcpts[0].raw_str(),
            "250-2.1.5 rcpt first line\r\n250-2.1.5 middle\r\n250 2.1.5 Ok\r\n"
        );
        assert_eq!(t.final_reply.code, 250);
        c.assert_in_sync();
    });
}

#[test]
fn multiline_final_reply_relayed_whole() {
    timed(30, || {
        let up = Upstream::builder()
            .reply(
                "DATA_END",
                Reply::text("250-2.0.0 first line\n250 2.0.0 queued as MULTI"),
            )
            .start();
        let p = Proxy::with_filter(&up, "cat");
        let mut c = p.open();
        let r = c.send_mail(&default_message());
        assert_eq!(
            r.raw_str(),
            "250-2.0.0 first line\r\n250 2.0.0 queued as MULTI\r\n"
        );
        c.assert_in_sync();
    });
}

#[test]
fn multiline_354_is_read_whole() {
    // deviation from 1.10: the original reads one line of the upstream's DATA reply.
    timed(30, || {
        let up = Upstream::builder()
            .reply_with("DATA", |_| {
                Some(Reply::text(
                    "354-go ahead\n354 End data with <CR><LF>.<CR><LF>",
                ))
            })
            .start();
        let p = Proxy::with_filter(&up, "cat");
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
        c.assert_in_sync();
        assert_bytes_eq!(up.expect_one().content, default_message());
    });
}

#[test]
fn multiline_rset_reply_after_rejection_is_read_whole() {
    // deviation from 1.10: the original reads one line of the reply to its own RSET.
    timed(30, || {
        let up = Upstream::builder()
            .reply(
                "RSET",
                Reply::text("250-2.0.0 flushed\n250 2.0.0 rset done"),
            )
            .start();
        let p = Proxy::with_filter(&up, "cat >/dev/null; echo 'no' >&2; exit 1");
        let mut c = p.open();
        assert_eq!(
            c.send_mail(&default_message()).raw_str(),
            "550 Content Rejected; no\r\n"
        );
        up.wait_command(0, secs(3), |l| l == "RSET");
        c.assert_in_sync();
    });
}

#[test]
fn multiline_xclient_reply_is_read_whole() {
    // deviation from 1.10: the original reads one line of the XCLIENT reply.
    timed(30, || {
        let up = Upstream::builder()
            .extensions(&["XCLIENT ADDR NAME", "8BITMIME"])
            .reply(
                "XCLIENT",
                Reply::text("220-upstream.test first\n220 upstream.test ESMTP"),
            )
            .start();
        let p = Proxy::with_setting(&up, "XClient", "on");
        let mut c = p.open();
        c.assert_in_sync();
        assert_eq!(
            c.cmd("MAIL FROM:<alice@example.org>").raw_str(),
            "250 2.1.0 Ok\r\n"
        );
    });
}
