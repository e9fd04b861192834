//! Clients that pipeline although PIPELINING is not advertised: replies must come in order
//! and nothing may be lost (the original silently loses such messages).

use crate::common;

use crate::common::upstream::Reply;
use crate::common::{default_message, message, ms, secs, stuff, timed, Proxy, Upstream};

const PIPELINING_UPSTREAM: &[&str] = &["PIPELINING", "SIZE 10240000", "8BITMIME"];

#[test]
fn pipelining_is_not_advertised() {
    timed(30, || {
        let up = Upstream::builder().extensions(PIPELINING_UPSTREAM).start();
        let p = Proxy::start(&up);
        let mut c = p.connect();
        c.greeting();
        let e = c.cmd("EHLO client.example");
        assert_eq!(
            e.raw_str(),
            "250-smtp.passthru\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
        );
    });
}

#[test]
fn pipelined_envelope_and_data() {
    // deviation from 1.10: the original answers DATA at once and later relays the MAIL reply as the final reply.
    timed(30, || {
        let up = Upstream::builder().extensions(PIPELINING_UPSTREAM).start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        c.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n");
        assert_eq!(c.reply().raw_str(), "250 2.1.0 Ok\r\n");
        assert_eq!(c.reply().raw_str(), "250 2.1.5 Ok\r\n");
        assert_eq!(c.reply().raw_str(), "250 2.1.5 Ok\r\n");
        assert_eq!(c.reply().code, 354);
        let msg = default_message();
        assert_eq!(c.body(&msg).raw_str(), "250 2.0.0 Ok: queued as UP0001\r\n");
        c.assert_in_sync();
        let m = up.expect_one();
        assert_bytes_eq!(m.content, msg);
        assert_eq!(m.rcpts.len(), 2);
        rec.assert_one_envelope("alice@example.org", "bob@example.net\ncarol@example.net");
    });
}

#[test]
fn whole_transactions_in_one_write() {
    // deviation from 1.10: the original loses pipelined messages.
    timed(30, || {
        let up = Upstream::start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        let (m1, m2, m3) = (
            message("one", b"first\r\n"),
            message("two", b".second\r\n"),
            message("three", b"third\r\n"),
        );
        let mut burst = Vec::new();
        for (i, m) in [&m1, &m2, &m3].iter().enumerate() {
            burst.extend(
                format!("MAIL FROM:<s{i}@example.org>\r\nRCPT TO:<r{i}@example.net>\r\nDATA\r\n")
                    .bytes(),
            );
            burst.extend(stuff(m));
        }
        burst.extend_from_slice(b"QUIT\r\n");
        c.send(&burst);
        let codes: Vec<u16> = (0..13).map(|_| c.reply().code).collect();
        assert_eq!(
            codes,
            [250, 250, 354, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
        );
        assert!(c.wait_eof(secs(5)), "not closed after QUIT");
        let d = up.wait_delivered(3, secs(5));
        for (i, (got, want)) in d.iter().zip([&m1, &m2, &m3]).enumerate() {
            assert_bytes_eq!(got.content, want, "message {i}");
            assert_eq!(
                got.mail_from,
                format!("MAIL FROM:<s{i}@example.org>\r\n").into_bytes()
            );
        }
        let runs = rec.wait_runs(3, secs(5));
        for (i, r) in runs.iter().enumerate() {
            assert_eq!(r.var("SENDER"), Some(format!("s{i}@example.org").as_str()));
            assert_eq!(
                r.var("RECIPIENTS"),
                Some(format!("r{i}@example.net").as_str())
            );
        }
    });
}

#[test]
fn pipelined_with_rejected_recipient() {
    // deviation from 1.10: replies of pipelined commands are matched to the wrong commands.
    timed(30, || {
        let up = Upstream::builder()
            .reply_when("RCPT", "bad@", "550 5.1.1 bad: no such user")
            .start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        c.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<bad@example.net>\r\nRCPT TO:<good@example.net>\r\nDATA\r\n");
        assert_eq!(c.reply().code, 250);
        assert_eq!(c.reply().raw_str(), "550 5.1.1 bad: no such user\r\n");
        assert_eq!(c.reply().code, 250);
        assert_eq!(c.reply().code, 354);
        assert_eq!(c.body(&default_message()).code, 250);
        assert_eq!(
            rec.wait_runs(1, secs(5))[0].var("RECIPIENTS"),
            Some("good@example.net")
        );
        assert_eq!(
            up.expect_one().rcpts,
            vec![b"RCPT TO:<good@example.net>\r\n".to_vec()]
        );
    });
}

#[test]
fn pipelined_without_accepted_recipient_is_not_delivered() {
    // deviation from 1.10: the original answers the pipelined DATA before the RCPT reply arrives.
    timed(30, || {
        let up = Upstream::builder()
            .reply("RCPT", Reply::text("550 5.1.1 no such user"))
            .start();
        let p = Proxy::with_filter(&up, "cat");
        let mut c = p.open();
        c.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<nobody@example.net>\r\nDATA\r\n");
        assert_eq!(c.reply().code, 250);
        assert_eq!(c.reply().code, 550);
        let mut r = c.reply();
        if r.code == 354 {
            r = c.body(&default_message());
        }
        assert!(r.code >= 500, "message without recipients got {r:?}");
        c.assert_in_sync();
        assert!(up.delivered().is_empty());
    });
}

#[test]
fn pipelined_commands_with_slow_upstream_keep_order() {
    // deviation from 1.10: no reply queue in the original.
    timed(30, || {
        let up = Upstream::builder()
            .reply("VRFY", Reply::text("252 2.0.0 slow vrfy").delay(ms(300)))
            .reply(
                "HELP",
                Reply::text("214-2.0.0 help one\n214 2.0.0 help two").delay(ms(200)),
            )
            .reply_with("NOOP", |c| {
                Some(Reply::text(&format!("250 2.0.0 noop #{}", c.nth)))
            })
            .start();
        let p = Proxy::start(&up);
        let mut c = p.connect();
        c.send(
            "EHLO client.example\r\nNOOP\r\nVRFY postmaster\r\nHELP\r\nNOOP\r\nRSET\r\nNOOP\r\n",
        );
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.reply().lines[0], "smtp.passthru");
        assert_eq!(c.reply().raw_str(), "250 2.0.0 noop #1\r\n");
        assert_eq!(c.reply().raw_str(), "252 2.0.0 slow vrfy\r\n");
        assert_eq!(
            c.reply().raw_str(),
            "214-2.0.0 help one\r\n214 2.0.0 help two\r\n"
        );
        assert_eq!(c.reply().raw_str(), "250 2.0.0 noop #2\r\n");
        assert_eq!(c.reply().raw_str(), "250 2.0.0 Ok\r\n");
        assert_eq!(c.reply().raw_str(), "250 2.0.0 noop #3\r\n");
        c.assert_silent(ms(300));
    });
}

#[test]
fn swaks_with_pipelining_option() {
    timed(30, || {
        let up = Upstream::builder().extensions(PIPELINING_UPSTREAM).start();
        let p = Proxy::with_filter(&up, "cat");
        for i in 0..3 {
            let to = format!("rcpt{i}@example.net");
            let Some(out) = common::peers::swaks(
                &p.addr(),
                &[
                    "--pipeline",
                    "--from",
                    "alice@example.org",
                    "--to",
                    &to,
                    "--body",
                    "pipelined body",
                ],
            ) else {
                return;
            };
            assert!(
                out.status.success(),
                "swaks failed:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let d = up.wait_delivered(3, secs(5));
        for (i, m) in d.iter().enumerate() {
            assert_eq!(
                m.rcpts,
                vec![format!("RCPT TO:<rcpt{i}@example.net>\r\n").into_bytes()]
            );
            assert!(String::from_utf8_lossy(&m.content).contains("pipelined body"));
        }
    });
}
