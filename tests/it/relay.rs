//! The command relay: greeting and HELO/EHLO rewriting, the EHLO extension filter, refused
//! commands, verbatim relaying, XFORWARD, XCLIENT, AUTH + Skip, FilterType reject,
//! OutAddress forms.

use crate::common;

use crate::common::upstream::Reply;
use crate::common::{default_message, ms, secs, timed, Client, Proxy, ProxyBuilder, Upstream};

const ALL_EXT: &[&str] = &[
    "SIZE 10240000",
    "PIPELINING",
    "8BITMIME",
    "STARTTLS",
    "CHUNKING",
    "BINARYMIME",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "XFORWARD NAME ADDR PROTO HELO",
    "XCLIENT NAME ADDR PROTO HELO",
    "AUTH PLAIN LOGIN",
    "SMTPUTF8",
    "CHECKPOINT",
    "XEXCH50",
    "ETRN",
];

/// An upstream greeting with `banner`, a proxy in front of it and a client connected to
/// the proxy (the greeting not read yet).
fn behind_banner(banner: &str) -> (Upstream, Proxy, Client) {
    let up = Upstream::builder().banner(banner).start();
    let p = Proxy::start(&up);
    let c = p.connect();
    (up, p, c)
}

#[test]
fn greeting_is_rewritten() {
    timed(30, || {
        let (_up, _p, mut c) = behind_banner("220 upstream.test ESMTP Postfix (secret version)");
        assert_eq!(c.greeting().raw_str(), "220 smtp.passthru\r\n");
    });
}

#[test]
fn multiline_greeting_first_line_rewritten() {
    // deviation from 1.10: the original passes a multi-line 220 greeting through unchanged,
    // upstream host name included; the shape (two lines) is kept for the client.
    timed(30, || {
        let (_up, _p, mut c) =
            behind_banner("220-upstream.test first line\n220 upstream.test second line");
        assert_eq!(
            c.greeting().raw_str(),
            "220-smtp.passthru\r\n220 upstream.test second line\r\n"
        );
        let e = c.cmd("EHLO client.example");
        assert_eq!(e.code, 250, "EHLO after a multi-line greeting: {e:?}");
        assert_eq!(e.lines[0], "smtp.passthru");
    });
}

#[test]
fn error_greeting_is_relayed_unchanged() {
    timed(30, || {
        let (_up, _p, mut c) = behind_banner("554 5.3.2 upstream.test not accepting mail");
        assert_eq!(
            c.greeting().raw_str(),
            "554 5.3.2 upstream.test not accepting mail\r\n"
        );
    });
}

#[test]
fn ehlo_host_line_rewritten_and_extensions_filtered() {
    timed(30, || {
        let up = Upstream::builder().extensions(ALL_EXT).start();
        let p = Proxy::start(&up);
        let mut c = p.connect();
        c.greeting();
        let r = c.cmd("EHLO client.example");
        let want = "250-smtp.passthru\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n\
                    250-XFORWARD NAME ADDR PROTO HELO\r\n250-AUTH PLAIN LOGIN\r\n250-SMTPUTF8\r\n250 ETRN\r\n";
        assert_eq!(r.raw_str(), want);
        assert_eq!(up.session(0).lines(), ["EHLO client.example"]);
    });
}

#[test]
fn filtered_last_extension_becomes_xfiltered() {
    timed(30, || {
        let up = Upstream::builder()
            .extensions(&["SIZE 1000", "PIPELINING", "CHUNKING"])
            .start();
        let p = Proxy::start(&up);
        let mut c = p.connect();
        c.greeting();
        let r = c.cmd("ehlo client.example");
        assert_eq!(
            r.raw_str(),
            "250-smtp.passthru\r\n250-SIZE 1000\r\n250 XFILTERED\r\n"
        );
        // The extension keyword match is case-insensitive.
        let up = Upstream::builder()
            .extensions(&["8BITMIME", "starttls"])
            .start();
        let p = Proxy::start(&up);
        let mut c = p.connect();
        c.greeting();
        assert_eq!(
            c.cmd("EHLO x").raw_str(),
            "250-smtp.passthru\r\n250-8BITMIME\r\n250 XFILTERED\r\n"
        );
    });
}

#[test]
fn helo_reply_rewritten() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::start(&up);
        let mut c = p.connect();
        c.greeting();
        assert_eq!(c.cmd("HELO old.example").raw_str(), "250 smtp.passthru\r\n");
        assert_eq!(c.send_mail(&default_message()).code, 250);
        assert_bytes_eq!(up.expect_one().content, default_message());
        assert_eq!(up.session(0).lines()[0], "HELO old.example");
    });
}

#[test]
fn ehlo_rejected_is_relayed_and_helo_fallback_works() {
    timed(30, || {
        let up = Upstream::builder()
            .reply("EHLO", Reply::text("502 5.5.2 EHLO not supported here"))
            .start();
        let p = Proxy::start(&up);
        let mut c = p.connect();
        c.greeting();
        assert_eq!(
            c.cmd("EHLO client.example").raw_str(),
            "502 5.5.2 EHLO not supported here\r\n"
        );
        assert_eq!(c.cmd("HELO client.example").code, 250);
        assert_eq!(c.send_mail(&default_message()).code, 250);
        up.expect_one();
    });
}

#[test]
fn starttls_and_bdat_refused_with_502() {
    timed(30, || {
        let up = Upstream::builder()
            .extensions(ALL_EXT)
            .reply("NOOP", Reply::text("250 2.0.0 noop-marker"))
            .start();
        let p = Proxy::start(&up);
        let mut c = p.open();
        for cmd in ["STARTTLS", "starttls", "BDAT 0 LAST", "BDAT 12"] {
            assert_eq!(
                c.cmd(cmd).raw_str(),
                "502 Command not implemented\r\n",
                "{cmd}"
            );
        }
        assert_eq!(
            c.cmd("NOOP").raw_str(),
            "250 2.0.0 noop-marker\r\n",
            "out of sync"
        );
        let verbs = up.session(0).verbs();
        assert!(
            !verbs.iter().any(|v| v == "STARTTLS" || v == "BDAT"),
            "relayed: {verbs:?}"
        );
    });
}

#[test]
fn client_xclient_refused_with_554() {
    timed(30, || {
        let up = Upstream::builder().extensions(ALL_EXT).start();
        let p = Proxy::start(&up);
        let mut c = p.open();
        let r = c.cmd("XCLIENT ADDR=10.9.8.7 NAME=spoofed.example");
        assert_eq!(r.raw_str(), "554 Insufficient authorization\r\n");
        assert_eq!(c.cmd("NOOP").code, 250);
        up.session(0).assert_no_verb("XCLIENT");
    });
}

#[test]
fn other_commands_relayed_verbatim_both_ways() {
    timed(30, || {
        let up = Upstream::builder()
            .reply("XYZZY", Reply::text("250 2.0.0 xyzzy-marker ok"))
            .reply(
                "HELP",
                Reply::text("214-2.0.0 first\n214-2.0.0 second\n214 2.0.0 end"),
            )
            .start();
        let p = Proxy::start(&up);
        let mut c = p.open();
        let sent = [
            "XYZZY plugh 42",
            "VRFY postmaster",
            "HELP",
            "FROBNICATE  two  spaces\tand tab",
            "noop lower case",
            "ETRN example.org",
        ];
        let replies: Vec<Vec<u8>> = sent.iter().map(|l| c.cmd(l).raw).collect();
        assert_eq!(replies[0], b"250 2.0.0 xyzzy-marker ok\r\n");
        assert_eq!(replies[1], b"252 2.0.0 Cannot VRFY user\r\n");
        assert_eq!(
            replies[2],
            b"214-2.0.0 first\r\n214-2.0.0 second\r\n214 2.0.0 end\r\n"
        );
        assert_eq!(replies[3], b"502 5.5.2 Error: command not recognized\r\n");
        assert_eq!(replies[4], b"250 2.0.0 Ok\r\n");
        let lines = up.session(0).lines();
        assert_eq!(&lines[1..], &sent[..], "upstream saw {lines:?}");
    });
}

#[test]
fn plain_relay_sends_nothing_extra() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::start(&up);
        let mut c = p.open();
        let msg = default_message();
        let t = c.transaction("<alice@example.org>", &["<bob@example.net>"], &msg);
        assert_eq!(
            t.final_reply.raw_str(),
            "250 2.0.0 Ok: queued as UP0001\r\n"
        );
        assert_eq!(c.cmd("QUIT").code, 221);
        assert!(up.wait_closed(0, secs(5)), "upstream not closed after QUIT");
        let s = up.session(0);
        assert_eq!(
            s.lines(),
            [
                "EHLO client.example",
                "MAIL FROM:<alice@example.org>",
                "RCPT TO:<bob@example.net>",
                "DATA",
                "QUIT"
            ]
        );
        assert_bytes_eq!(s.messages[0].content, msg);
        assert_eq!(up.session_count(), 1);
        p.assert_tmp_clean();
    });
}

#[test]
fn quit_relayed_and_both_sides_closed() {
    timed(30, || {
        let up = Upstream::builder()
            .reply(
                "QUIT",
                Reply::text("221 2.0.0 upstream-bye-marker").then_close(),
            )
            .start();
        let p = Proxy::start(&up);
        let mut c = p.open();
        assert_eq!(c.cmd("QUIT").raw_str(), "221 2.0.0 upstream-bye-marker\r\n");
        assert!(
            c.wait_eof(secs(5)),
            "client connection not closed after QUIT"
        );
        assert!(up.wait_closed(0, secs(5)), "upstream connection not closed");
    });
}

#[test]
fn upstream_close_in_command_phase_closes_client() {
    timed(30, || {
        let up = Upstream::builder()
            .reply("NOOP", Reply::text("421 4.3.2 going down").then_close())
            .start();
        let p = Proxy::start(&up);
        let mut c = p.open();
        assert_eq!(c.cmd("NOOP").raw_str(), "421 4.3.2 going down\r\n");
        assert!(
            c.wait_eof(secs(5)),
            "client connection not closed after the upstream left"
        );
    });
}

#[test]
fn xforward_relayed_and_captured_for_the_filter() {
    timed(30, || {
        let up = Upstream::start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        let x1 = "XFORWARD NAME=spike.porcupine.org ADDR=168.100.189.2 PORT=4711";
        let x2 = "XFORWARD PROTO=ESMTP HELO=spike.porcupine.org SOURCE=REMOTE";
        assert_eq!(c.cmd(x1).code, 250);
        assert_eq!(c.cmd(x2).code, 250);
        assert_eq!(c.send_mail(&default_message()).code, 250);
        // XFORWARD values belong to one transaction.
        assert_eq!(c.send_mail(&default_message()).code, 250);
        let lines = up.session(0).lines();
        assert!(
            lines.contains(&x1.to_string()) && lines.contains(&x2.to_string()),
            "{lines:?}"
        );
        let runs = rec.wait_runs(2, secs(5));
        assert_eq!(runs[0].var("REMOTE"), Some("168.100.189.2"));
        assert_eq!(runs[0].var("REMOTE_HELO"), Some("spike.porcupine.org"));
        assert_eq!(runs[0].var("CLIENT"), Some("127.0.0.1"));
        assert_eq!(
            runs[1].var("REMOTE"),
            None,
            "REMOTE leaked into the next transaction"
        );
        assert_eq!(runs[1].var("REMOTE_HELO"), None);
    });
}

#[test]
fn xforward_refused_by_upstream_is_not_captured() {
    timed(30, || {
        let up = Upstream::builder()
            .reply("XFORWARD", Reply::text("550 5.7.0 not authorized"))
            .start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        assert_eq!(
            c.cmd("XFORWARD ADDR=10.1.2.3 HELO=h.example").raw_str(),
            "550 5.7.0 not authorized\r\n"
        );
        assert_eq!(c.send_mail(&default_message()).code, 250);
        let run = &rec.wait_runs(1, secs(5))[0];
        assert_eq!(run.var("REMOTE"), None);
        assert_eq!(run.var("REMOTE_HELO"), None);
    });
}

#[test]
fn xclient_option_sends_client_address_before_mail() {
    timed(30, || {
        let up = Upstream::builder()
            .extensions(&["SIZE 1000000", "XCLIENT NAME ADDR PROTO HELO", "8BITMIME"])
            .start();
        let p = Proxy::with_setting(&up, "XClient", "on");
        let mut c = p.connect();
        c.greeting();
        let e = c.cmd("EHLO client.example");
        assert!(
            !e.keywords().contains(&"XCLIENT".to_string()),
            "XCLIENT advertised: {e:?}"
        );
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &default_message(),
        );
        assert_eq!(
            t.mail.raw_str(),
            "250 2.1.0 Ok\r\n",
            "XCLIENT reply leaked to the client?"
        );
        assert_eq!(t.final_reply.code, 250);
        c.assert_in_sync();
        let lines = up.session(0).lines();
        let xi = lines
            .iter()
            .position(|l| l.starts_with("XCLIENT"))
            .unwrap_or_else(|| panic!("no XCLIENT: {lines:?}"));
        let mi = lines
            .iter()
            .position(|l| l.starts_with("MAIL"))
            .unwrap_or(0);
        assert!(xi < mi, "XCLIENT not before MAIL: {lines:?}");
        assert!(lines[xi].contains("ADDR=127.0.0.1"), "{}", lines[xi]);
        up.expect_one();
    });
}

#[test]
fn xclient_option_resends_ehlo_after_xclient() {
    // deviation from 1.10: the original does not repeat EHLO after XCLIENT (Postfix resets the session).
    timed(30, || {
        let up = Upstream::builder()
            .extensions(&["XCLIENT NAME ADDR PROTO HELO", "8BITMIME"])
            .start();
        let p = Proxy::with_setting(&up, "XClient", "on");
        let mut c = p.open();
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &default_message(),
        );
        assert_eq!(t.mail.raw_str(), "250 2.1.0 Ok\r\n");
        assert_eq!(
            c.cmd("NOOP").raw_str(),
            "250 2.0.0 Ok\r\n",
            "a reply leaked"
        );
        let lines = up.session(0).lines();
        let xi = lines
            .iter()
            .position(|l| l.starts_with("XCLIENT"))
            .unwrap_or_else(|| panic!("no XCLIENT: {lines:?}"));
        assert_eq!(
            lines.get(xi + 1).map(|s| s.as_str()),
            Some("EHLO client.example"),
            "{lines:?}"
        );
        assert!(lines[xi + 2].starts_with("MAIL"), "{lines:?}");
    });
}

#[test]
fn xclient_option_not_sent_when_not_advertised() {
    timed(30, || {
        let up = Upstream::builder()
            .extensions(&["SIZE 1000000", "8BITMIME"])
            .start();
        let p = Proxy::with_setting(&up, "XClient", "on");
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
        up.session(0).assert_no_verb("XCLIENT");
    });
}

#[test]
fn auth_235_with_skip_authenticated_bypasses_filter() {
    timed(30, || {
        let up = Upstream::builder()
            .extensions(&["AUTH PLAIN", "8BITMIME"])
            .start();
        let b = ProxyBuilder::new().upstream(&up);
        let reject = b.counted("cat >/dev/null; echo '550 5.7.1 filtered' >&2; exit 1");
        let p = b
            .set("FilterCommand", &reject)
            .set("Skip", "authenticated")
            .set("Header", "X-Scanned: yes")
            .start();
        let mut c = p.open();
        assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").code, 235);
        let msg = default_message();
        assert_eq!(c.send_mail(&msg).code, 250, "authenticated message");
        let m = up.expect_one();
        assert_bytes_eq!(
            m.content,
            msg,
            "skipped message must pass unchanged (no Header)"
        );
        assert_eq!(
            p.filter_runs(),
            0,
            "the filter ran for an authenticated session"
        );
        // Unauthenticated: filtered (and rejected).
        let mut c2 = p.open();
        let r = c2.send_mail(&msg);
        assert_eq!(r.raw_str(), "550 5.7.1 filtered\r\n");
        assert_eq!(up.delivered().len(), 1);
        // An AUTH that fails does not authenticate.
        let up2 = Upstream::builder()
            .reply("AUTH", Reply::text("535 5.7.8 bad credentials"))
            .start();
        let b2 = ProxyBuilder::new().upstream(&up2);
        let p2 = b2
            .set("FilterCommand", &reject)
            .set("Skip", "authenticated")
            .start();
        let mut c3 = p2.open();
        assert_eq!(c3.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").code, 535);
        assert_eq!(c3.send_mail(&msg).code, 550);
    });
}

#[test]
fn filter_type_reject_default_reply() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_setting(&up, "FilterType", "reject");
        let mut c = p.open();
        assert_eq!(
            c.cmd("MAIL FROM:<alice@example.org>").raw_str(),
            "530 Email Rejected\r\n"
        );
        assert_eq!(
            c.cmd("RCPT TO:<bob@example.net>").raw_str(),
            "530 Email Rejected\r\n"
        );
        assert_eq!(c.cmd("DATA").raw_str(), "530 Email Rejected\r\n");
        assert_eq!(c.cmd("NOOP").code, 250);
        std::thread::sleep(ms(200));
        let verbs = up.session(0).verbs();
        assert!(
            !verbs
                .iter()
                .any(|v| v == "MAIL" || v == "RCPT" || v == "DATA"),
            "{verbs:?}"
        );
    });
}

#[test]
fn filter_type_reject_texts() {
    timed(30, || {
        let up = Upstream::start();
        for (setting, want) in [
            ("Go away", "550 Content Rejected; Go away\r\n"),
            (
                "554 5.7.1 No mail accepted here",
                "554 5.7.1 No mail accepted here\r\n",
            ),
        ] {
            let p = ProxyBuilder::new()
                .upstream(&up)
                .set("FilterType", "reject")
                .set("FilterReject", setting)
                .start();
            let mut c = p.open();
            assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").raw_str(), want);
            assert_eq!(c.cmd("RCPT TO:<bob@example.net>").raw_str(), want);
        }
    });
}

#[test]
fn outaddress_bare_port_connects_back_to_client_address() {
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .set("OutAddress", &up.port().to_string())
            .start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
        up.expect_one();
    });
}

#[test]
fn outaddress_unix_socket() {
    timed(30, || {
        let dir = tempfile::tempdir().expect("tempdir");
        let up = Upstream::builder()
            .unix(&dir.path().join("upstream.sock"))
            .start();
        let p = Proxy::start(&up);
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
        assert_bytes_eq!(up.expect_one().content, default_message());
    });
}

#[test]
fn concurrent_sessions_do_not_mix() {
    timed(30, || {
        let up = Upstream::start();
        let (p, rec) = Proxy::recording_env(&up);
        let addr = p.addr();
        let workers: Vec<_> = (0..6)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = Client::open(addr);
                    let body = format!("message {i}\r\n").repeat(2000);
                    let msg = common::message(&format!("msg{i}"), body.as_bytes());
                    let from = format!("<sender{i}@example.org>");
                    let to = format!("<rcpt{i}@example.net>");
                    let t = c.transaction(&from, &[&to], &msg);
                    assert_eq!(t.final_reply.code, 250, "session {i}");
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        let msgs = up.wait_delivered(6, secs(10));
        for m in &msgs {
            let from = String::from_utf8_lossy(&m.mail_from).to_string();
            let i = from
                .trim_start_matches("MAIL FROM:<sender")
                .chars()
                .next()
                .unwrap_or('?');
            assert!(
                String::from_utf8_lossy(&m.content).contains(&format!("Subject: msg{i}\r\n")),
                "cross-talk"
            );
            assert_eq!(
                String::from_utf8_lossy(&m.rcpts[0]),
                format!("RCPT TO:<rcpt{i}@example.net>\r\n")
            );
        }
        for r in rec.wait_runs(6, secs(5)) {
            let s = r.var("SENDER").unwrap_or("").to_string();
            let i = s.trim_start_matches("sender").chars().next().unwrap_or('?');
            assert_eq!(
                r.var("RECIPIENTS"),
                Some(format!("rcpt{i}@example.net").as_str())
            );
        }
    });
}
